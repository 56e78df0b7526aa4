"""libp2p identities of the private Petals swarm's peers, derived from one seed."""
