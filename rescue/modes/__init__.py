"""One module per `mode=`, each with `main(cfg)`: `run` (generate, evaluate, report),
`evaluate` (re-evaluate a run's records), `infer` (one image, one query), `merge` (join the
shards of a study). `rescue.app` dispatches; a mode never imports it."""
