"""fiesnap: rollback checkpoints for plain ext4/XFS on stock dm-snapshot."""

__version__ = "0.1.0"
