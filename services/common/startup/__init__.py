"""Checks that stop a service at start-up with one clear line: environment settings, patch fences."""
