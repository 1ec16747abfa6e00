"""dm-bow compatible backup-on-write model (issue 5); empty until then."""
