"""What the services share, in one subpackage per reason to change."""
