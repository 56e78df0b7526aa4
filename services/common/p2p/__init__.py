"""libp2p identities of the private Petals swarm's peers, derived from one seed; the grouped inference
stream's messages (grouped_steps.py)."""
