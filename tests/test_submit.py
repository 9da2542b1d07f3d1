"""Slurm submission (pretrain/submit.py): what is checked before submitting, what in the job."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from conftest import TINY_MAE

from pretrain.config import ConfigError

submitit = pytest.importorskip("submitit")


class FakeExecutor:
    """submitit.AutoExecutor that records the job instead of submitting it."""

    submitted: list = []

    def __init__(self, folder, cluster=None, **kwargs):
        self.cluster = "slurm"

    def update_parameters(self, **kwargs):
        self.parameters = kwargs

    def submit(self, job):
        FakeExecutor.submitted.append(job)
        return SimpleNamespace(job_id="42")


def submit(monkeypatch, tmp_path, **values):
    from pretrain import submit as submit_module

    FakeExecutor.submitted = []
    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    config = dict(
        model="mae_vit_base_patch16",
        model_kwargs=TINY_MAE,
        input_size=32,
        batch_size=4,
        epochs=1,
        warmup_epochs=0,
        num_workers=0,
        device="cpu",
        output_dir=str(tmp_path / "out"),
        **values,
    )
    path = tmp_path / "c.yaml"
    path.write_text(json.dumps(config))
    code = submit_module.main(["--ngpus", "1", "--config", str(path)])
    return code, FakeExecutor.submitted


def test_data_path_mounted_only_on_the_cluster_is_checked_in_the_job(monkeypatch, tmp_path):
    """A data set that is not on the submitting host does not stop the submission; the job
    itself rejects it, with the message, if it is missing on the nodes too."""
    cluster_only = "/datasets/only-on-the-cluster/imagenet"
    code, jobs = submit(monkeypatch, tmp_path, data_path=cluster_only)
    assert code == 0 and len(jobs) == 1 and jobs[0].cfg.data_path == cluster_only
    with pytest.raises(ConfigError, match="data_path '/datasets/only-on-the-cluster/imagenet'"):
        jobs[0]()  # what each task runs first: the whole validation, data_path included


def test_everything_else_is_still_checked_before_submitting(monkeypatch, tmp_path, capfd):
    """Refused with exit code 2 and the values named, as every other entry point."""
    code, jobs = submit(monkeypatch, tmp_path, data_path="/not/here", blr=-1.0, mask_ratio=1.5)
    err = capfd.readouterr().err
    assert code == 2 and not jobs
    assert "blr must be > 0" in err and "mask_ratio" in err
    assert "/not/here" not in err  # the data set is checked in the job, on its nodes
    code, jobs = submit(monkeypatch, tmp_path, data_path="")
    assert code == 2 and "data_path is required" in capfd.readouterr().err


def test_one_launcher_submits_every_protocol(monkeypatch, tmp_path):
    """tools/submit.py PROTOCOL: fine-tuning and linear probing jobs run their own trainer;
    paths are left to the job, bad values are refused before submitting (exit code 2)."""
    from mae_transfer.classification.config import FinetuneConfig, LinprobeConfig
    from mae_transfer.classification.main import submit_main

    FakeExecutor.submitted = []
    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    common = ["--ngpus", "2", "--data_path", "/cluster/imagenet", "--finetune", "/cluster/m.pth"]
    common += ["--output_dir", str(tmp_path / "out")]
    assert submit_main(["finetune", *common, "--epochs", "30"]) == 0
    assert submit_main(["linprobe", *common]) == 0
    ft, lp = FakeExecutor.submitted
    assert type(ft.cfg) is FinetuneConfig and ft.cfg.epochs == 30
    assert type(lp.cfg) is LinprobeConfig and lp.cfg.global_pool == "cls"
    assert submit_main(["finetune", *common, "--layer_decay", "3"]) == 2
    assert submit_main(["nonsense"]) == 2 and len(FakeExecutor.submitted) == 2


def test_launcher_values_and_help(monkeypatch, tmp_path, capsys):
    """--ngpus 0 was a submitit IndexError traceback; --nodes -1 / --timeout -5 passed."""
    from mae_transfer.classification.main import submit_main
    from pretrain import submit as submit_module

    FakeExecutor.submitted = []
    monkeypatch.setattr(submitit, "AutoExecutor", FakeExecutor)
    for bad in (["--ngpus", "0"], ["--nodes", "-1"], ["--timeout", "-5"]):
        with pytest.raises(SystemExit) as e:
            submit_module.main([*bad, "--output_dir", str(tmp_path)])
        assert e.value.code == 2 and f"{bad[0]} must be >= 1" in capsys.readouterr().err
    assert not FakeExecutor.submitted
    # --mem_gb_per_gpu 0 is Slurm's --mem=0 (all of a node's memory): allowed
    from mae_transfer.engine.slurm import parse_launcher

    assert parse_launcher("x", ["--mem_gb_per_gpu", "0"])[0].mem_gb_per_gpu == 0
    with pytest.raises(SystemExit) as e:
        submit_module.main(["--help"])
    assert e.value.code == 0
    assert "Every other flag goes to the training run" in capsys.readouterr().out
    assert submit_main(["--help"]) == 0
    assert "tools/finetune.py --help" in capsys.readouterr().out


def test_without_slurm_nothing_runs_here_unasked(monkeypatch, tmp_path, capfd):
    """submitit falls back to local processes without Slurm: --nodes 8 was a raw traceback,
    one node 'submitted job 22814' that then failed on a path only its log named."""
    from pretrain import submit as submit_module

    class NoSlurm(FakeExecutor):
        def __init__(self, folder, cluster=None, **kwargs):
            self.cluster = cluster or "local"

    FakeExecutor.submitted = []
    monkeypatch.setattr(submitit, "AutoExecutor", NoSlurm)
    flags = ["--ngpus", "1", "--output_dir", str(tmp_path / "out"), "--data_path", "/not/here"]
    assert submit_module.main(flags) == 2
    assert "no Slurm here (sbatch not found)" in capfd.readouterr().err
    with pytest.raises(SystemExit) as e:
        submit_module.main(["--cluster", "local", "--nodes", "8", *flags])
    assert e.value.code == 2 and "runs on this machine: one node" in capfd.readouterr().err
    assert submit_module.main(["--cluster", "local", *flags]) == 2  # its paths: checked here
    assert "data_path '/not/here'" in capfd.readouterr().err and not FakeExecutor.submitted
