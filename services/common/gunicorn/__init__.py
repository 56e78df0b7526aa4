"""gunicorn plumbing: the services' shared config, the hardened threaded worker, a memory-debug hook."""
