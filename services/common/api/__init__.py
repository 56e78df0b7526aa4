"""The generate API's parameters, as clients send them and as the gateway sends them on to a replica."""
