"""The shared training machinery on paths no single CPU process exercises: several ranks (gloo),
resuming across world sizes, mocked CUDA devices, no host sync per step."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os

import pytest
import torch
from conftest import (
    TINY_MAE,
    count_host_reads,
    record_evaluations,
    run_ranks,
    train_until_killed,
    write_images,
)

import mae_transfer.engine.trainer as trainer_module
from mae_transfer.engine import distributed as distributed_module
from mae_transfer.engine.config import ConfigError
from mae_transfer.engine.distributed import DistInfo, init_distributed, local_cuda_index
from mae_transfer.engine.state import get_rng_state, set_rng_state
from mae_transfer.engine.trainer import (
    LAST,
    NonFiniteLossError,
    _saved_epoch_loss,
    make_scaler,
    set_tf32,
    tf32_enabled,
)
from pretrain.config import make_config, validate
from pretrain.engine import Trainer


def tiny_cfg(out, data, **kw):
    values = dict(
        model="mae_vit_base_patch16",
        model_kwargs=TINY_MAE,
        input_size=32,
        batch_size=4,
        epochs=2,
        warmup_epochs=1,
        blr=1e-3,
        data_path=data,
        num_workers=0,
        device="cpu",
        amp="fp32",
        log_every_iters=1,
        output_dir=str(out),
    )
    values.update(kw)
    cfg = make_config(values)
    validate(cfg)
    return cfg


def train(cfg) -> Trainer:
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    t.train()
    t.close()
    return t


# -- several ranks ---------------------------------------------------------------------------
def _resume_with_own_output_dir(info, dirs, data):
    cfg = tiny_cfg(dirs[info.rank], data, epochs=3)
    t = Trainer(cfg, torch.device("cpu"), info)
    return t.epoch, t.iter, float(sum(p.detach().double().sum() for p in t.model.parameters()))


def test_rank0_decides_what_every_rank_resumes_from(tmp_path, image_dir):
    """Rank 1's output_dir has no checkpoint (node-local storage, stale caches): it must still
    resume from the one rank 0 chose, or the replicas would silently train apart."""
    first = train(tiny_cfg(tmp_path / "rank0", image_dir, epochs=1))
    dirs = [str(tmp_path / "rank0"), str(tmp_path / "rank1")]
    results = run_ranks(_resume_with_own_output_dir, dirs, image_dir)
    assert all(status == "ok" for status, _ in results.values()), results
    (e0, i0, w0), (e1, i1, w1) = results[0][1], results[1][1]
    assert (e0, i0) == (e1, i1) == (1, 0)
    expected = float(sum(p.detach().double().sum() for p in first.model.parameters()))
    assert w0 == w1 == pytest.approx(expected)


def _save_with_inf_weights(info, out, data):
    t = Trainer(tiny_cfg(out, data, epochs=1), torch.device("cpu"), info)
    with torch.no_grad():
        t.model.blocks[0].mlp.fc1.weight[0, 0] = float("inf")
    try:
        t.save()
    except NonFiniteLossError as e:
        return f"raised: {e}"
    return "saved"


def test_non_finite_weights_stop_every_rank(tmp_path, image_dir):
    """Only rank 0 used to check: the others walked on into the next collective and waited
    for the 30-minute timeout. Every rank must stop, with the message."""
    results = run_ranks(_save_with_inf_weights, str(tmp_path / "out"), image_dir)
    for rank, (status, value) in results.items():
        assert status == "ok" and value.startswith("raised: non-finite weights"), (rank, value)
    assert not (tmp_path / "out" / LAST).exists()


def _nan_loss_on_rank1(info, out, data):
    cfg = tiny_cfg(out, data, epochs=2, log_every_iters=2, batch_size=2)
    t = Trainer(cfg, torch.device("cpu"), info)
    compute, calls = t.compute_loss, []

    def poisoned(*a):
        calls.append(1)
        loss = compute(*a)
        return loss * float("nan") if info.rank == 1 and len(calls) == 4 else loss

    t.compute_loss = poisoned
    try:
        t.train()
    except NonFiniteLossError as e:
        finite = all(torch.isfinite(p).all() for p in t.model.parameters())
        return str(e), t.epoch, t.iter, finite
    return "finished", t.epoch, t.iter, True


def test_a_nan_loss_on_one_rank_stops_all_ranks_together(tmp_path, image_dir):
    results = run_ranks(_nan_loss_on_rank1, str(tmp_path / "out"), image_dir)
    seen = {rank: value for rank, (status, value) in results.items() if status == "ok"}
    assert len(seen) == 2, results
    # 3 iterations per epoch: call 4 is epoch 1, iteration 0; the log step after iteration 1
    # sees it, on both ranks, and the NaN update was skipped on both (weights finite)
    for message, epoch, it, finite in seen.values():
        assert message.startswith("loss is nan at epoch 1, iteration 0-1"), message
        assert (epoch, it, finite) == (1, 2, True)
    ckpt = torch.load(tmp_path / "out" / LAST, weights_only=True)
    assert (ckpt["epoch"], ckpt["iter"]) == (1, 0)


def _grads_after_two_updates(info, out, data):
    cfg = tiny_cfg(out, data, epochs=1, log_every_iters=100, batch_size=2)
    t = Trainer(cfg, torch.device("cpu"), info)
    t.sampler.set_epoch(0)
    t.set_train_mode()
    ptrs = []
    for *tensors, skipped in t.loader:
        t._step(tensors, skipped)
        grads = [p.grad for p in t.model.parameters() if p.requires_grad]
        if any(g is None for g in grads):
            return "gradients freed after the update"
        ptrs.append([g.data_ptr() for g in grads])
    # DDP makes the gradients bucket views during the first backward: compare the later steps
    return len(ptrs) == 3 and ptrs[1] == ptrs[2]


def test_ddp_gradients_stay_in_their_buckets_between_updates(tmp_path, image_dir):
    """gradient_as_bucket_view saves a copy of every gradient only if they are zeroed in place:
    set to None, backward allocates new ones and DDP copies them into the buckets each step."""
    results = run_ranks(_grads_after_two_updates, str(tmp_path / "out"), image_dir)
    assert all(status == "ok" and value is True for status, value in results.values()), results


def _weights(t) -> list:
    return [p.detach().clone() for p in t.model.parameters()]


def _killed_and_resumed(info, ref_dir, out, data):
    """An uninterrupted 2-epoch run, and the same run killed in epoch 1 and resumed; mask
    noise drawn from each rank's own stream in the forward (what drop path does)."""
    kw = dict(epochs=2, batch_size=2, mask_noise="global", save_every_iters=1)
    ref = Trainer(tiny_cfg(ref_dir, data, **kw), torch.device("cpu"), info)
    ref.train()
    t = Trainer(tiny_cfg(out, data, **kw), torch.device("cpu"), info)
    step, calls = t._step, []

    def dying_step(*a):
        calls.append(1)
        if len(calls) == 5:  # epoch 1, iteration 1 (3 iterations per epoch)
            raise InterruptedError
        return step(*a)

    t._step = dying_step
    with contextlib.suppress(InterruptedError):
        t.train()
    resumed = Trainer(tiny_cfg(out, data, **kw), torch.device("cpu"), info)
    at = (resumed.epoch, resumed.iter)
    resumed.train()
    same = all(torch.equal(a, b) for a, b in zip(_weights(ref), _weights(resumed)))
    return at, same


def test_a_resumed_multi_process_run_equals_the_uninterrupted_one(tmp_path, image_dir):
    """Only rank 0's random state was saved and the others were reseeded on resume: their
    drop path and mask noise then differed from the uninterrupted run's."""
    results = run_ranks(_killed_and_resumed, str(tmp_path / "ref"), str(tmp_path / "b"), image_dir)
    assert all(status == "ok" for status, _ in results.values()), results
    for at, same in (value for _, value in results.values()):
        assert at == (1, 1) and same


def _save_with_a_full_disk_on_rank0(info, out, data):
    t = Trainer(tiny_cfg(out, data, epochs=1), torch.device("cpu"), info)
    if info.rank == 0:

        def full(*a, **k):
            raise OSError(28, "No space left on device")

        trainer_module.save_atomic = full
    try:
        t.save()
    except ConfigError as e:
        return str(e)
    return "saved"


def test_a_write_failing_on_rank0_stops_every_rank_with_its_reason(tmp_path, image_dir):
    """Only rank 0 writes: its OSError was a traceback there while the others waited in their
    next collective (with NCCL, up to the 30-minute timeout)."""
    out = str(tmp_path / "out")
    results = run_ranks(_save_with_a_full_disk_on_rank0, out, image_dir)
    messages = {rank: value for rank, (status, value) in results.items() if status == "ok"}
    assert len(messages) == 2, results
    for message in messages.values():
        assert message.startswith("1 of 2 processes could not write"), message
    assert "No space left on device" in messages[0]


def test_checkpoints_take_the_umask_and_stale_temporaries_are_removed(tmp_path, image_dir):
    """mkstemp makes 0600 files (other users of a shared cluster could not read checkpoints),
    and a process killed mid-write left a whole-checkpoint-sized temporary file forever."""
    out = tmp_path / "out"
    os.makedirs(out)
    stale, fresh = out / ".tmp-killed.pth", out / ".tmp-writing.pth"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (1, 1))
    old = os.umask(0o022)
    try:
        train(tiny_cfg(out, image_dir, epochs=1))
    finally:
        os.umask(old)
    assert oct((out / LAST).stat().st_mode & 0o777) == oct(0o644)
    assert not stale.exists() and fresh.exists()  # a write in progress is left alone


# -- resuming with another batch size / world size / accumulation -----------------------------
def _killed_after(cfg, iterations: int) -> Trainer:
    """A run stopped after ``iterations`` batches of epoch 0, with its checkpoint saved."""
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    t.sampler.set_epoch(0)
    t.set_train_mode()
    for step, (*tensors, skipped) in enumerate(t.loader):
        t._step(tensors, skipped)
        if step + 1 == iterations:
            break
    t._flush()
    t.save()
    t.close()
    return t


def test_an_unreadable_checkpoint_last_falls_back_to_the_newest_readable_copy(
    tmp_path, image_dir, caplog
):
    """Written atomically, checkpoint-last.pth can still be damaged by the storage: auto-resume
    stopped with an error although the epoch copies beside it were sound."""
    out = tmp_path / "out"
    train(tiny_cfg(out, image_dir, epochs=2, save_every_epochs=1))
    last = out / LAST
    good = last.read_bytes()
    last.write_bytes(good[: len(good) // 2])  # cut short
    t = Trainer(tiny_cfg(out, image_dir, epochs=2), torch.device("cpu"), DistInfo())
    assert (t.epoch, t.iter) == (2, 0)  # checkpoint-1.pth: as far along as the damaged one
    assert f"{last} cannot be read" in caplog.text and "checkpoint-1.pth instead" in caplog.text
    # kept aside; the copy takes its place (the end of a run reads it: encoder.pth)
    assert (out / (LAST + ".unreadable")).is_file()
    assert last.read_bytes() == (out / "checkpoint-1.pth").read_bytes()
    t.train()  # nothing to do: all epochs done
    t.close()
    last.write_bytes(b"PK\x03\x04 damaged")
    (out / "checkpoint-1.pth").write_bytes(b"PK\x03\x04 damaged")
    t = Trainer(tiny_cfg(out, image_dir, epochs=3), torch.device("cpu"), DistInfo())
    assert (t.epoch, t.iter) == (1, 0)  # checkpoint-0.pth
    t.close()
    last.write_bytes(b"PK\x03\x04 damaged")
    with pytest.raises(ConfigError, match="resume from: cannot read checkpoint .*checkpoint-1.pth"):
        Trainer(  # asked for by name: an error, not a fallback
            tiny_cfg(out, image_dir, epochs=3, resume=str(out / "checkpoint-1.pth")),
            torch.device("cpu"),
            DistInfo(),
        )
    elsewhere = tmp_path / "kept.pth"
    os.replace(out / "checkpoint-0.pth", elsewhere)
    with pytest.raises(ConfigError, match="no checkpoint-.*pth beside it can be read"):
        Trainer(tiny_cfg(out, image_dir, epochs=3), torch.device("cpu"), DistInfo())
    # a readable --resume: taken, the damaged one passed over
    t = Trainer(
        tiny_cfg(out, image_dir, epochs=3, resume=str(elsewhere)), torch.device("cpu"), DistInfo()
    )
    assert (t.epoch, t.iter) == (1, 0)
    t.close()


def test_a_run_started_afresh_moves_an_earlier_run_s_checkpoints_aside(tmp_path, image_dir):
    """They mixed with the new run's, and a fallback from an unreadable checkpoint-last.pth
    could resume the earlier run's furthest copy as if it were this run's."""
    out = tmp_path / "out"
    train(tiny_cfg(out, image_dir, epochs=3, save_every_epochs=1))  # run A
    train(tiny_cfg(out, image_dir, epochs=1, save_every_epochs=1, auto_resume=False))  # run B
    names = sorted(p.name for p in out.iterdir() if "checkpoint" in p.name)
    assert names == [
        "checkpoint-0.pth",
        "checkpoint-0.pth.old",
        "checkpoint-1.pth.old",
        "checkpoint-2.pth.old",
        "checkpoint-last.pth",
        "checkpoint-last.pth.old",
    ]
    (out / LAST).write_bytes(b"PK\x03\x04 damaged")
    t = Trainer(tiny_cfg(out, image_dir, epochs=1), torch.device("cpu"), DistInfo())
    assert t._resumed_from == str(out / "checkpoint-0.pth")  # B's, not A's checkpoint-2
    t.close()
    t = Trainer(tiny_cfg(out, image_dir, epochs=1), torch.device("cpu"), DistInfo())
    assert t._resumed_from == str(out / LAST)  # (an ordinary resume moves nothing)
    assert not (out / "checkpoint-0.pth.old.1").exists()
    t.close()


def test_mid_epoch_resume_continues_at_the_same_sample_with_another_global_batch(
    tmp_path, tmp_path_factory
):
    data = str(tmp_path_factory.mktemp("data"))
    write_images(data, 24)
    out = tmp_path / "out"
    _killed_after(tiny_cfg(out, data, batch_size=4, save_every_iters=1), iterations=2)  # 8 seen
    ref = Trainer(tiny_cfg(out, data, batch_size=4), torch.device("cpu"), DistInfo())
    seen = list(ref.sampler)  # epoch 0's keys, from its first sample
    ref.close()
    for batch, accum, expect_iter in ((2, 1, 4), (8, 1, 1), (2, 2, 4), (2, 4, 4)):
        t = Trainer(
            tiny_cfg(out, data, batch_size=batch, accum_iter=accum),
            torch.device("cpu"),
            DistInfo(),
        )
        assert (t.epoch, t.iter) == (0, expect_iter), (batch, accum)
        t.sampler.set_epoch(0, start_batch=t.iter)
        # the same permutation, continued at sample 8 (epochs are cut to whole global batches)
        rest = [k for k in t.sampler]
        assert rest == seen[8 : 8 + len(rest)] and len(rest) == 16, (batch, accum)
        t.close()


def test_mid_epoch_resume_refuses_a_misaligned_update(tmp_path, image_dir):
    out = tmp_path / "out"
    _killed_after(tiny_cfg(out, image_dir, batch_size=4, save_every_iters=1), iterations=2)
    for batch, accum in ((3, 1), (2, 3)):
        with pytest.raises(ConfigError, match="8 samples into epoch 0.*not a whole number"):
            Trainer(
                tiny_cfg(out, image_dir, batch_size=batch, accum_iter=accum),
                torch.device("cpu"),
                DistInfo(),
            )


def test_the_newer_of_resume_and_checkpoint_last_wins(tmp_path, image_dir):
    """After a torchrun elastic restart the command line still names the first --resume file;
    the run's own, newer checkpoint-last.pth must win (and an older one must not)."""
    out = tmp_path / "out"
    train(tiny_cfg(out, image_dir, epochs=1, save_every_epochs=1))
    early = tmp_path / "early.pth"
    os.replace(out / "checkpoint-0.pth", early)
    train(tiny_cfg(out, image_dir, epochs=2))  # checkpoint-last at epoch 2
    t = Trainer(
        tiny_cfg(out, image_dir, epochs=3, resume=str(early)), torch.device("cpu"), DistInfo()
    )
    assert t.epoch == 2
    t.close()
    os.replace(out / LAST, tmp_path / "late.pth")
    os.replace(early, out / LAST)
    t = Trainer(
        tiny_cfg(out, image_dir, epochs=3, resume=str(tmp_path / "late.pth")),
        torch.device("cpu"),
        DistInfo(),
    )
    assert t.epoch == 2
    t.close()


# -- no host sync per step, and no non-finite update ------------------------------------------
def test_one_host_sync_per_log_step_not_per_iteration(tmp_path, image_dir, monkeypatch):
    calls = []
    real = trainer_module.all_reduce_sum

    def counting(values, info):
        calls.append(len(values))
        return real(values, info)

    monkeypatch.setattr(trainer_module, "all_reduce_sum", counting)
    train(tiny_cfg(tmp_path / "out", image_dir, epochs=1, log_every_iters=100))
    assert len(calls) == 1  # 3 iterations, one flush at the end of the epoch


def test_a_nan_between_log_steps_is_never_applied(tmp_path, image_dir):
    cfg = tiny_cfg(tmp_path / "out", image_dir, epochs=1, log_every_iters=100)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    compute, calls, before = t.compute_loss, [], {}

    def poisoned(*a):
        calls.append(1)
        if len(calls) == 2:
            before.update({n: p.detach().clone() for n, p in t.model.named_parameters()})
            return compute(*a) * float("nan")
        if len(calls) == 3:  # the NaN update (iteration 1) was skipped: nothing moved
            assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
        return compute(*a)

    t.compute_loss = poisoned
    with pytest.raises(NonFiniteLossError, match="loss is nan at epoch 0, iteration 0-2"):
        t.train()
    assert len(calls) == 3 and not (tmp_path / "out" / LAST).exists()


def test_an_fp16_overflow_on_cpu_is_skipped_and_the_scale_lowered(tmp_path, image_dir):
    """fp16 on CPU gets dynamic loss scaling as on CUDA: one overflowing gradient skips its
    update and halves the scale, and the run goes on (behind the scale-1 guard it stopped)."""
    cfg = tiny_cfg(tmp_path / "out", image_dir, epochs=1, log_every_iters=1, amp="fp16")
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    assert t.amp_dtype == torch.float16
    compute, calls, before = t.compute_loss, [], {}
    start_scale = t.scaler.get_scale()

    def overflowing(*a):
        calls.append(1)
        if len(calls) == 2:  # a finite loss whose scaled fp16 gradients overflow
            before.update({n: p.detach().clone() for n, p in t.model.named_parameters()})
            return compute(*a) * 1e9
        if len(calls) == 3:  # the overflowing update (iteration 1) was skipped
            assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters())
        return compute(*a)

    t.compute_loss = overflowing
    t.train()
    t.close()
    assert len(calls) == 3 and (tmp_path / "out" / LAST).exists()
    assert t.scaler.get_scale() == start_scale / 2
    # a CPU fp16 checkpoint of the scale-1 guard (before CPU fp16 had loss scaling) leaves the
    # resumed dynamic scaler at its own start, not pinned at scale 1
    ckpt = torch.load(tmp_path / "out" / LAST, weights_only=False)
    ckpt["scaler"] = make_scaler(torch.device("cpu"), fp16=False).state_dict()
    torch.save(ckpt, tmp_path / "guard.pth")
    cfg = tiny_cfg(tmp_path / "again", image_dir, epochs=2, amp="fp16")
    cfg.resume = str(tmp_path / "guard.pth")
    resumed = Trainer(cfg, torch.device("cpu"), DistInfo())
    assert resumed.epoch == 1 and resumed.scaler.get_scale() == start_scale
    resumed.close()


# -- CUDA placement, RNG and TF32 without a GPU -----------------------------------------------
def test_slurm_local_id_is_taken_modulo_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert local_cuda_index(5) == 0
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    assert local_cuda_index(5) == 5
    chosen = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(distributed_module.dist, "init_process_group", lambda *a, **k: None)
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # init_distributed sets RANK, WORLD_SIZE:
        monkeypatch.setenv(name, "0")  # recorded here, so that they are removed afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("SLURM_NTASKS", "16")
    monkeypatch.setenv("SLURM_PROCID", "13")
    monkeypatch.setenv("SLURM_LOCALID", "5")
    # an sbatch script / salloc shell: SLURM_NTASKS is set but no srun step runs; a plain
    # `python tools/knn.py ...` there is one process and must not wait for 15 peers
    assert not init_distributed("cuda").enabled and chosen == []
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "16")  # a task of `srun`
    info = init_distributed("cuda")
    assert (info.rank, info.local_rank, info.world_size) == (13, 5, 16)
    assert chosen == [1]  # one GPU per task bound 4 ways: local id 5 is this node's 2nd GPU


def test_each_process_runs_on_its_own_gpu_whatever_device_was_asked(monkeypatch):
    from mae_transfer.engine.distributed import own_device

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # bound by init_distributed
    four = DistInfo(rank=3, local_rank=3, world_size=4)
    for asked in ("cuda:0", "cuda"):  # cuda:0 would have put every rank on GPU 0
        assert own_device(torch.device(asked), four) == torch.device("cuda", 3)
    assert own_device(torch.device("cpu"), four) == torch.device("cpu")
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    # one process on cuda:1 makes it current: bare "cuda" (the fused-AdamW probe, the loader's
    # pin-memory thread) had opened a context and allocated on GPU 0
    assert own_device(torch.device("cuda:1"), DistInfo()) == torch.device("cuda:1")
    assert own_device(torch.device("cuda"), DistInfo()) == torch.device("cuda")
    assert chosen == [1]


def test_the_fused_adamw_probe_runs_on_the_given_device(monkeypatch):
    from mae_transfer import device as dev

    where = []

    def zeros(*shape, device=None, **kw):
        where.append(device)
        raise RuntimeError("no such device here")

    monkeypatch.setattr(torch, "zeros", zeros)
    try:
        assert not dev.fused_adamw_supported(torch.device("cuda", 3))
        assert not dev.fused_adamw_supported("cuda:3")  # probed once per device
    finally:
        dev._fused_adamw_probe.cache_clear()
    assert where == ["cuda:3"]


def test_cuda_rng_state_is_the_process_own_device_only(monkeypatch):
    """A checkpoint saved on 8 visible GPUs must resume on a process that sees one."""
    restored = []

    def set_state(state, device="cuda"):
        index = torch.device(device).index or 0
        if index >= 1:
            raise RuntimeError(f"invalid device ordinal {index}")
        restored.append((int(state[0]), index))

    monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    dev = torch.device("cuda", 0)
    saved = get_rng_state(dev)
    assert torch.equal(saved["cuda"], torch.tensor([7]))
    set_rng_state(saved, dev)
    old_format = {"torch": torch.get_rng_state(), "cuda": [torch.tensor([i]) for i in range(8)]}
    set_rng_state(old_format, dev)
    assert restored == [(7, 0), (0, 0)]


def test_tf32_is_a_choice_for_training_and_on_for_evaluation():
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    set_tf32(False)
    assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
    with tf32_enabled(torch.device("cuda")):
        assert (matmul.fp32_precision, conv.fp32_precision) == ("tf32", "tf32")
    assert matmul.fp32_precision == "ieee"
    with tf32_enabled(torch.device("cpu")):  # nothing to do on a CPU
        assert matmul.fp32_precision == "ieee"
    set_tf32(True)
    assert matmul.fp32_precision == "tf32"
    set_tf32(False)


def test_a_missing_or_non_mapping_yaml_is_named(tmp_path):
    from mae_transfer.engine.config import read_yaml

    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        read_yaml(str(tmp_path / "nope.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml must hold a mapping of config keys, got list"):
        read_yaml(str(tmp_path / "list.yaml"))
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert read_yaml(str(tmp_path / "empty.yaml")) == {}


def test_a_resume_file_without_model_weights_is_named(tmp_path, image_dir):
    bad = tmp_path / "bad.pth"
    torch.save({"epoch": 1, "optimizer": {}}, bad)
    cfg = tiny_cfg(tmp_path / "out", image_dir, resume=str(bad))
    with pytest.raises(ConfigError, match="bad.pth holds no 'model' weights to resume: --resume"):
        Trainer(cfg, torch.device("cpu"), DistInfo())


def test_config_dataclasses_share_the_run_fields():
    from mae_transfer.engine.config import TrainConfig
    from pretrain.config import PretrainConfig

    shared = {f.name for f in dataclasses.fields(TrainConfig)}
    assert shared <= {f.name for f in dataclasses.fields(PretrainConfig)}
    assert PretrainConfig().epochs == 400 and TrainConfig().epochs == 100


# -- no host sync inside a training step ------------------------------------------------------
@pytest.mark.parametrize("amp", ["fp32", "bf16"])
def test_training_steps_read_nothing_back_to_the_host(tmp_path, image_dir, monkeypatch, amp):
    """Steps between log steps queue work and return: on a GPU any value read back (loss,
    scaler flag, a Python number from a tensor) would stall every step. Pretraining with
    gradient accumulation (no_sync steps and update steps), in fp32 and bf16."""
    from test_pretrain import tiny_cfg

    from pretrain.engine import Trainer

    cfg = tiny_cfg(
        tmp_path,
        image_dir,
        model_kwargs={**TINY_MAE, "depth": 1, "decoder_depth": 1},
        batch_size=2,
        accum_iter=2,
        epochs=1,
        warmup_epochs=0,
        log_every_iters=1000,  # the epoch's end is its only log step
        amp=amp,
    )
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    reads = count_host_reads(t, monkeypatch)
    t.train()
    t.close()
    assert reads == [6]  # 6 steps (12 images / batch 2), not one value read on the host


def _list_on_ranks(info, root):
    import os

    from mae_transfer.data import find_images
    from mae_transfer.engine.distributed import on_rank0

    walks, real = [], os.walk
    os.walk = lambda *a, **k: walks.append(1) or real(*a, **k)
    try:
        files = on_rank0(find_images, info, root)
        walked = len(walks)
        try:
            on_rank0(find_images, info, os.path.join(root, "missing"))
            error = None
        except FileNotFoundError as e:
            error = str(e)
    finally:
        os.walk = real
    try:
        on_rank0(lambda: lambda: None, info)  # a result that cannot be sent
        unsent = None
    except RuntimeError as e:
        unsent = type(e).__name__
    return list(files), walked, error, unsent


def test_rank_0_lists_the_data_and_every_rank_gets_the_list_or_its_error(image_dir):
    """On a shared filesystem 64 processes walking 1.28M files each load its metadata server
    for minutes: rank 0 walks, the others receive; a listing error reaches every process
    instead of leaving them waiting."""
    results = run_ranks(_list_on_ranks, image_dir)
    assert all(status == "ok" for status, _ in results.values()), results
    (files0, walked0, error0, unsent0), (files1, walked1, error1, unsent1) = (
        results[0][1],
        results[1][1],
    )
    assert files0 == files1 and len(files0) == 12
    assert walked0 >= 1 and walked1 == 0
    assert error0 == error1 and "no images" in error0
    assert unsent0 == unsent1 == "RuntimeError"  # raised everywhere, nobody left waiting


def test_mid_epoch_saves_come_at_the_first_update_after_each_multiple(tmp_path, image_dir):
    t = Trainer(tiny_cfg(tmp_path / "out", image_dir), torch.device("cpu"), DistInfo())
    t.ipe = 100

    def due(every, accum):
        t.cfg.save_every_iters, t.cfg.accum_iter = every, accum
        saves = []
        for it in range(1, 100):
            t.iter = it
            if t._mid_epoch_save_due():
                saves.append(it)
        return saves

    assert due(10, 1) == list(range(10, 100, 10))
    assert due(10, 4) == [12, 20, 32, 40, 52, 60, 72, 80, 92]  # was 20, 40, 60, 80 only
    assert due(3, 2)[:3] == [4, 6, 10] and due(0, 2) == []
    t.close()


def _records(out):
    with open(out / "log.jsonl") as f:
        return [json.loads(line) for line in f]


def _killed_in_epoch_0(cfg):
    """Trains until the 4th iteration starts: saved at iteration 2, iteration 3 logged."""
    train_until_killed(Trainer(cfg, torch.device("cpu"), DistInfo()), 0, 3)


def test_a_resumed_run_logs_each_step_once_and_the_whole_epoch_s_loss(tmp_path, image_dir):
    kw = dict(epochs=2, batch_size=3, log_every_iters=1, save_every_iters=2)
    train(tiny_cfg(tmp_path / "a", image_dir, **kw))  # uninterrupted: 4 iterations per epoch
    _killed_in_epoch_0(tiny_cfg(tmp_path / "b", image_dir, **kw))
    assert [r["step"] for r in _records(tmp_path / "b") if "step" in r] == [1, 2, 3]
    train(tiny_cfg(tmp_path / "b", image_dir, **kw))  # resumes at iteration 2 of epoch 0
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    steps = [r["step"] for r in b if "step" in r]
    assert steps == [r["step"] for r in a if "step" in r] == list(range(1, 9))
    ends_a, ends_b = ([r for r in log if "train_loss" in r] for log in (a, b))
    assert [r["epoch"] for r in ends_b] == [r["epoch"] for r in ends_a] == [0, 1]
    # the resumed epoch's loss is over all its iterations, not only those after the resume
    losses_a = [r["train_loss"] for r in ends_a]
    assert [r["train_loss"] for r in ends_b] == pytest.approx(losses_a, rel=1e-6)


def test_a_resumed_epoch_s_loss_counts_each_image_once_with_another_batch(
    tmp_path, tmp_path_factory
):
    """The epoch's loss was a mean over the processes' batches: resumed with another batch
    size or process count, each batch before the checkpoint weighed as one of the new size."""
    data = str(tmp_path_factory.mktemp("data"))
    write_images(data, 24)
    out = tmp_path / "out"
    killed = _killed_after(tiny_cfg(out, data, batch_size=4, save_every_iters=1), iterations=2)
    first = killed._epoch_loss[0] / killed._epoch_loss[1]  # the mean over its 8 images
    train(tiny_cfg(out, data, batch_size=2))  # resumes at iteration 4 of epoch 0's 12
    records = _records(out)
    rest = [r["loss"] for r in records if "step" in r and r["epoch"] <= 1]  # 2 images each
    assert len(rest) == 8
    end = next(r for r in records if "train_loss" in r)
    assert end["train_loss"] == pytest.approx((8 * first + 2 * sum(rest)) / 24, rel=1e-6)
    # an earlier checkpoint's sum of 2 processes' batch means (global batch 4): 4 images
    old = {"epoch_loss": [5.0, 2], "global_batch": 4, "rng_per_rank": [{}, {}]}
    assert _saved_epoch_loss(old) == [10.0, 4]


def _tensorboard_steps(folder, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def test_going_back_to_an_earlier_checkpoint_hides_every_later_curve_in_tensorboard(
    tmp_path, image_dir
):
    """Per-epoch curves count by epoch, per-iteration ones by step: one purge_step could not
    hide both, and the epochs trained again were drawn twice."""
    kw = dict(epochs=3, batch_size=3, log_every_iters=1, save_every_epochs=1)
    train(tiny_cfg(tmp_path, image_dir, **kw))  # 4 iterations per epoch
    back = str(tmp_path / "checkpoint-0.pth")  # after the first epoch
    train(tiny_cfg(tmp_path, image_dir, resume=back, auto_resume=False, **kw))
    assert _tensorboard_steps(tmp_path / "epoch", "epoch/train_loss") == [0, 1, 2]
    assert _tensorboard_steps(tmp_path, "train/loss") == list(range(1, 13))
    assert [r["epoch"] for r in _records(tmp_path) if "train_loss" in r] == [0, 1, 2]


def test_a_run_killed_before_its_first_checkpoint_is_logged_once_after_a_restart(
    tmp_path, image_dir
):
    """The restart trains from scratch but appended to the killed run's log.jsonl: steps 1-3
    twice (and a second initial evaluation record)."""
    kw = dict(epochs=1, batch_size=3, log_every_iters=1, save_every_iters=0)
    _killed_in_epoch_0(tiny_cfg(tmp_path / "b", image_dir, **kw))
    assert not (tmp_path / "b" / LAST).exists()
    train(tiny_cfg(tmp_path / "b", image_dir, **kw))
    assert [r["step"] for r in _records(tmp_path / "b") if "step" in r] == [1, 2, 3, 4]
    assert (tmp_path / "b" / "log.jsonl.old").is_file()  # the killed run's, kept aside


def test_a_run_resumed_with_another_batch_keeps_the_records_before_its_checkpoint(
    tmp_path, image_dir
):
    kw = dict(epochs=2, log_every_iters=1, save_every_iters=2)
    _killed_in_epoch_0(tiny_cfg(tmp_path, image_dir, batch_size=3, **kw))  # 6 images seen
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"epoch": 0.8, "st')  # the kill cut the last line short
    train(tiny_cfg(tmp_path, image_dir, batch_size=6, **kw))  # 2 iterations per epoch now
    fractions = [r["epoch"] for r in _records(tmp_path) if "step" in r]
    assert fractions == [0.25, 0.5, 1.0, 1.5, 2.0]  # 0.75 (after the checkpoint) dropped


# -- a requeue signal: checkpoint first, then submitit's requeue ------------------------------
def test_the_requeue_signal_is_recorded_then_handed_to_submitit(monkeypatch):
    import signal

    from mae_transfer.engine import preemption

    submitit_handler, alarms = [], []
    monkeypatch.setattr(signal, "alarm", alarms.append)
    old = signal.signal(signal.SIGUSR2, lambda signum, frame: submitit_handler.append(signum))
    try:
        preemption.install(signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert preemption.requested() and submitit_handler == []  # recorded, not acted on
        assert alarms == [preemption.FALLBACK_S]  # submitit's requeue anyway if no checkpoint
        preemption.hand_over()
        assert submitit_handler == [signal.SIGUSR2] and alarms[-1] == 0
        # rank 0 hands over also when only another task received the signal
        preemption.reset()
        preemption.hand_over(signal.SIGUSR2)
        assert submitit_handler == [signal.SIGUSR2] * 2
        # loader workers inherit the handler: a signal there is not the run's
        preemption.reset()
        preemption._request.pid = -1
        os.kill(os.getpid(), signal.SIGUSR2)
        assert not preemption.requested()
    finally:
        preemption.reset()
        signal.signal(signal.SIGUSR2, old)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def _stop_when_rank1_is_signalled(info, out, data):
    from mae_transfer.engine import preemption

    cfg = tiny_cfg(out, data, epochs=3, batch_size=2, mask_noise="global")
    t = Trainer(cfg, torch.device("cpu"), info)
    step, calls = t._step, []

    def counting_step(*a):
        calls.append(1)
        return step(*a)

    t._step = counting_step
    # the signal reaches rank 1 only, during its 5th iteration (epoch 1, iteration 1)
    preemption.requested = lambda: info.rank == 1 and len(calls) >= 5
    try:
        t.train()
    except preemption.PreemptionStop as e:
        stopped = str(e)
    else:
        stopped = "not stopped"
    ckpt = torch.load(os.path.join(out, LAST), weights_only=True)
    return stopped, (ckpt["epoch"], ckpt["iter"])


def test_a_requeue_signal_stops_every_rank_after_a_checkpoint_at_the_same_step(tmp_path, image_dir):
    """submitit requeued at once from wherever training was: with save_every_iters 0 (the
    default) up to a whole epoch was trained again after every time-out."""
    results = run_ranks(_stop_when_rank1_is_signalled, str(tmp_path / "out"), image_dir)
    assert all(status == "ok" for status, _ in results.values()), results
    for stopped, at in (value for _, value in results.values()):
        assert stopped.startswith("stopped for a requeue at epoch 1, iteration 2"), stopped
        assert at == (1, 2)  # the log step after the signal (log_every_iters 1), saved there


def test_a_run_stopped_for_a_requeue_resumes_to_the_uninterrupted_weights(
    tmp_path, image_dir, monkeypatch
):
    from mae_transfer.engine import preemption

    ref = train(tiny_cfg(tmp_path / "a", image_dir, epochs=2, accum_iter=1))
    cfg = tiny_cfg(tmp_path / "b", image_dir, epochs=2)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    monkeypatch.setattr(preemption, "requested", lambda: t.epoch == 1 and t.iter >= 1)
    with pytest.raises(preemption.PreemptionStop):
        t.train()
    t.close()
    monkeypatch.setattr(preemption, "requested", lambda: False)
    resumed = Trainer(cfg, torch.device("cpu"), DistInfo())
    assert (resumed.epoch, resumed.iter) == (1, 1)
    resumed.train()
    resumed.close()
    for a, b in zip(_weights(ref), _weights(resumed)):
        assert torch.equal(a, b)


def test_a_live_runs_folder_is_refused_before_its_checkpoint_is_loaded(
    tmp_path, image_dir, monkeypatch, caplog
):
    """The refusal came after 'resumed from .../checkpoint-last.pth at epoch N' was logged."""
    from mae_transfer.engine import state

    out = tmp_path / "out"
    train(tiny_cfg(out, image_dir, epochs=1))
    (out / state.OWNER_FILE).write_text(json.dumps({"pid": 1}))
    monkeypatch.setattr(state, "_same_process_alive", lambda owner: True)
    with caplog.at_level(logging.INFO), pytest.raises(ConfigError, match="in use by another"):
        Trainer(tiny_cfg(out, image_dir, epochs=2), torch.device("cpu"), DistInfo())
    assert "resumed from" not in caplog.text and (out / LAST).exists()


def test_two_runs_in_one_output_dir_are_refused_or_stopped(tmp_path, image_dir):
    """A second run given the same output_dir resumed the first one's checkpoint while it
    was still training, and both wrote checkpoint-last.pth and log.jsonl, silently."""
    import json
    import socket
    import subprocess
    import sys

    from mae_transfer.engine import state
    from mae_transfer.engine.state import OWNER_FILE

    out = tmp_path / "out"
    os.makedirs(out)
    owner = out / OWNER_FILE
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"host": socket.gethostname(), "pid": alive.pid, "id": "x"}
        record.update(pidns=state._pid_namespace(), start=state._process_start(alive.pid))
        owner.write_text(json.dumps(record))
        with pytest.raises(
            ConfigError, match=f"in use by another run on this host .pid {alive.pid}"
        ):
            Trainer(tiny_cfg(out, image_dir, epochs=1), torch.device("cpu"), DistInfo())
        record["start"] = "0"  # the pid now another process (reused): not the run
        owner.write_text(json.dumps(record))
        Trainer(tiny_cfg(out, image_dir, epochs=1), torch.device("cpu"), DistInfo()).close()
    finally:
        alive.kill()
        alive.wait()
    # its process gone (a requeue, a crash): taken over
    a = Trainer(tiny_cfg(out, image_dir, epochs=1), torch.device("cpu"), DistInfo())
    # another run claims the folder (here from this process; from another host it cannot be
    # refused): the first stops at its next save instead of overwriting the other's files
    b = Trainer(tiny_cfg(out, image_dir, epochs=1), torch.device("cpu"), DistInfo())
    with pytest.raises(ConfigError, match="another run took over"):
        a.save()
    a._window.add(torch.tensor(1.0), 0)  # and at its next log step, before writing logs
    with pytest.raises(ConfigError, match="another run took over"):
        a._flush()
    b.save()
    a.close()
    b.close()
    train(tiny_cfg(out, image_dir, epochs=1))
    assert not owner.exists()  # released at the end: the next run here (a resume) may start


def test_a_kill_while_saving_never_leaves_a_checkpoint_naming_a_missing_copy(
    tmp_path, image_dir, monkeypatch
):
    """checkpoint-last.pth (recording the best accuracy) was written before the best copy: a
    kill in between left a run that reported a checkpoint-best.pth that did not exist."""
    out = tmp_path / "out"
    t = Trainer(tiny_cfg(out, image_dir, epochs=1), torch.device("cpu"), DistInfo())
    real = trainer_module.copy_atomic

    def killed_at_last(src, dst):
        if dst.endswith(LAST):
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(trainer_module, "copy_atomic", killed_at_last)
    t.epoch = 1  # as at the end of epoch 0
    with pytest.raises(KeyboardInterrupt):
        t.save(also_epoch_copy=True, copies=["checkpoint-best.pth"])
    assert (out / "checkpoint-best.pth").is_file() and (out / "checkpoint-0.pth").is_file()
    assert not (out / LAST).exists()  # the older state (here: none) stays the resume point
    monkeypatch.setattr(trainer_module, "copy_atomic", real)
    t.save(copies=["checkpoint-best.pth"])
    best = torch.load(out / "checkpoint-best.pth", weights_only=True)
    assert best["epoch"] == torch.load(out / LAST, weights_only=True)["epoch"]
    t.close()


def test_a_requeue_signal_in_an_epoch_s_last_steps_saves_and_leaves_the_evaluation_to_the_requeue(
    tmp_path, image_dir, monkeypatch
):
    from mae_transfer.engine import preemption

    cfg = tiny_cfg(tmp_path / "out", image_dir, epochs=2)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    events = []
    save, evaluate = t.save, t._evaluate
    t.save = lambda **kw: events.append(("save", t.epoch, t.iter)) or save(**kw)
    t._evaluate = lambda: events.append(("evaluate", t.epoch)) or evaluate()
    monkeypatch.setattr(preemption, "requested", lambda: t.epoch == 0 and t.iter == 3)
    with pytest.raises(preemption.PreemptionStop, match="after epoch 0"):
        t.train()
    # (the first evaluation is the initial model's, the k-NN monitor's epoch -1)
    assert events == [("evaluate", 0), ("save", 1, 0)]
    t.close()
    monkeypatch.setattr(preemption, "requested", lambda: False)
    resumed = Trainer(cfg, torch.device("cpu"), DistInfo())
    evaluated = record_evaluations(resumed)
    resumed.train()
    resumed.close()
    assert evaluated == [1, 2]  # epoch 0's evaluation first, then epoch 1's
    assert [r["epoch"] for r in _records(tmp_path / "out") if "train_loss" in r] == [0, 1]


def test_a_record_cut_short_by_a_kill_is_dropped_before_the_evaluation_is_logged_again(
    tmp_path, image_dir
):
    """The record appended after a resume went onto the end of the cut line: both were lost."""
    cfg = tiny_cfg(tmp_path, image_dir, epochs=1)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())
    record = t.log.record

    def killed_while_writing(r):
        if "train_loss" not in r:
            return record(r)
        with open(t.log.path, "a") as f:
            f.write(json.dumps(r)[:20])
        raise KeyboardInterrupt

    t.log.record = killed_while_writing
    with pytest.raises(KeyboardInterrupt):
        t.train()
    t.close()
    train(cfg)  # checkpoint-last.pth: epoch 0's evaluation pending, its record unreadable
    ends = [r for r in _records(tmp_path) if "train_loss" in r]  # (every line parses)
    assert [r["epoch"] for r in ends] == [0]


def test_a_finished_run_s_pending_last_evaluation_is_done_when_resumed_elsewhere(
    tmp_path, image_dir
):
    t = Trainer(tiny_cfg(tmp_path / "a", image_dir, epochs=1), torch.device("cpu"), DistInfo())
    t.evaluate = lambda: (_ for _ in ()).throw(_EvalCrash) if t.epoch == 1 else {}
    with pytest.raises(_EvalCrash):
        t.train()
    t.close()
    resume = str(tmp_path / "a" / LAST)
    train(tiny_cfg(tmp_path / "b", image_dir, epochs=1, resume=resume))  # (was refused)
    assert [r["epoch"] for r in _records(tmp_path / "b") if "train_loss" in r] == [0]


class _EvalCrash(Exception):
    pass


def test_a_crash_in_an_epoch_s_evaluation_loses_no_training(tmp_path, image_dir, monkeypatch):
    """The checkpoint was written after the evaluation: a crash in it (out of memory with the
    evaluation's larger batches, a node lost) lost the whole epoch."""
    ref = train(tiny_cfg(tmp_path / "a", image_dir, epochs=2))
    cfg = tiny_cfg(tmp_path / "b", image_dir, epochs=2)
    t = Trainer(cfg, torch.device("cpu"), DistInfo())

    def crash_after_epoch_0():
        if t.epoch == 1:
            raise _EvalCrash
        return {}

    t.evaluate = crash_after_epoch_0
    with pytest.raises(_EvalCrash):
        t.train()
    t.close()
    resumed = Trainer(cfg, torch.device("cpu"), DistInfo())
    assert (resumed.epoch, resumed.iter) == (1, 0)
    evaluated = record_evaluations(resumed)
    resumed.train()
    resumed.close()
    assert evaluated == [1, 2]  # the crashed evaluation (epoch 0's) first
    for a, b in zip(_weights(ref), _weights(resumed)):
        assert torch.equal(a, b)  # evaluating does not move the training's random streams
    ends_a, ends_b = ([r for r in _records(tmp_path / d) if "train_loss" in r] for d in "ab")
    assert [r["epoch"] for r in ends_b] == [0, 1]
    assert [r["train_loss"] for r in ends_b] == [r["train_loss"] for r in ends_a]


def test_an_evaluated_epoch_is_not_evaluated_again_on_resume(tmp_path, image_dir, monkeypatch):
    """checkpoint-last.pth keeps the evaluation pending until the next save: a run resumed from
    it finds the epoch's record in log.jsonl (written after the evaluation and its copies)."""
    cfg = tiny_cfg(tmp_path, image_dir, epochs=2)
    train_until_killed(Trainer(cfg, torch.device("cpu"), DistInfo()), 1, 1)
    assert torch.load(tmp_path / LAST, weights_only=True)["eval_pending"]["epoch"] == 0
    resumed = Trainer(cfg, torch.device("cpu"), DistInfo())
    evaluated = record_evaluations(resumed)
    resumed.train()
    resumed.close()
    assert evaluated == [2]
    assert [r["epoch"] for r in _records(tmp_path) if "train_loss" in r] == [0, 1]
    # a finished run's checkpoint is written once more after the last evaluation
    assert torch.load(tmp_path / LAST, weights_only=True)["eval_pending"] is None


def test_the_progress_line_shows_the_last_evaluation(tmp_path, image_dir):
    """It kept the previous evaluation's accuracy: the line was redrawn by training only."""
    t = Trainer(
        tiny_cfg(tmp_path, image_dir, log_every_iters=1000), torch.device("cpu"), DistInfo()
    )

    def evaluate():
        t.bar_extras["acc1"] = f"{10.0 * t.epoch:.1f}"
        return {"acc1": 10.0 * t.epoch}

    t.evaluate = evaluate
    t.train()
    t.close()
    assert "acc1=20.0" in t.log.bar.postfix and "loss=" in t.log.bar.postfix


def test_a_finished_run_asked_for_fewer_epochs_says_so_and_keeps_its_config(
    tmp_path, image_dir, caplog
):
    train(tiny_cfg(tmp_path, image_dir, epochs=2))
    config = (tmp_path / "config.yaml").read_text()
    caplog.set_level("INFO")
    train(tiny_cfg(tmp_path, image_dir, epochs=1))
    assert "has finished 2 epochs (--epochs 1)" in caplog.text
    assert (tmp_path / "config.yaml").read_text() == config  # (it trained with epochs 2)


def test_a_picture_s_output_path(tmp_path):
    """A missing folder given with its slash was taken for a name without suffix
    ('folder/.png': PIL's 'unknown file extension' once the model had run)."""
    from mae_transfer.engine.launch import picture_path

    assert picture_path(str(tmp_path / "new") + "/", "p.png") == str(tmp_path / "new" / "p.png")
    assert (tmp_path / "new").is_dir()
    assert picture_path(str(tmp_path / "new"), "p.png") == str(tmp_path / "new" / "p.png")
    assert picture_path(str(tmp_path / "a" / "b"), "p.png") == str(tmp_path / "a" / "b.png")
    assert picture_path(str(tmp_path / "c.jpg"), "p.png") == str(tmp_path / "c.jpg")
    # a dot that is no suffix the writer knows: PIL / matplotlib refused it after the model ran
    assert picture_path(str(tmp_path / "x.v1"), "p.png") == str(tmp_path / "x.v1.png")
    assert picture_path(str(tmp_path / "m0.9"), "p", {".svg"}) == str(tmp_path / "m0.9.png")
    assert picture_path(str(tmp_path / "m.svg"), "p", {".svg"}) == str(tmp_path / "m.svg")


def test_ctrl_c_ends_a_tool_in_one_line_saying_how_to_continue(caplog):
    """Ctrl-C during training was a KeyboardInterrupt traceback, exit code 1."""
    from mae_transfer.engine.launch import RESUME_HINT, exit_code

    def interrupted():
        raise KeyboardInterrupt

    assert exit_code(interrupted, resume=RESUME_HINT) == 130
    assert f"interrupted: {RESUME_HINT}" in caplog.text
    assert exit_code(lambda: None) == 0
