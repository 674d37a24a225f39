"""dnc_lab."""
