"""dm-bow compatible backup-on-write: its state machine, on-disk log, trace replay and the
restore tool (docs/bow-format.md)."""
