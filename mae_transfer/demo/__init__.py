"""The one-command demo's machinery: seeded runs in parallel lanes, their statistics, the
representation check (k-NN) and the charts. ``tools/demo.py`` strings the stages together."""
