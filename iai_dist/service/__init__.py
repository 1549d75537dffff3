"""The Ray service: episode-worker actors feed a Ray Train learner that publishes its weights back.

    runtime.py         connect to a cluster (RAY_ADDRESS, `ray job submit`) or start an embedded local Ray
    episode_worker.py  EpisodeWorker actors (sample, roll out, inner-loss gradients)
    board.py           the WeightBoard actor (published weights by version; imports Ray, not torch)
    feed.py            a rank's experience source (requests to its episode workers, exact staleness, weight
                       publication) and its checkpoint sink (ray.train.report)
    learner_loop.py    Ray Train's per-rank function: restore, then the core's learner loop over the feed
    fit.py             the driver side: actors + TorchTrainer + checkpoints, one call per training

Only this package (and the command lines) import Ray; the core it wraps imports torch only. Import from the
modules: this package imports nothing, so an actor of one module (the board) loads only what that module needs.
"""
