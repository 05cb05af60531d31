"""The Ray side: starting or joining a cluster, loopback-only listeners, the launcher that builds
the one `TorchTrainer` of a run, and every workaround for Ray's own behaviour (quarantined in
`ray_workarounds`)."""
