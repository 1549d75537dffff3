"""The Ray service: episode-worker actors feed a Ray Train learner that publishes its weights back.

    runtime.py         connect to a cluster (RAY_ADDRESS, `ray job submit`) or start an embedded local Ray
    episode_worker.py  EpisodeWorker actors (sample, roll out, inner-loss gradients)
    board.py           the WeightBoard actor (published weights by version; imports Ray, not torch)
    feed.py            a rank's experience source (requests to its episode workers, exact staleness, weight
                       publication) and its checkpoint sink (ray.train.report)
    learner_loop.py    Ray Train's per-rank function: restore, then the core's learner loop over the feed
    fit.py             the driver side: actors + TorchTrainer + checkpoints, one call per training

Only this package (and the command lines) import Ray; the core it wraps imports torch only. Import from the
modules: this package imports none of them, so an actor of one module (the board) loads only what that module needs.
"""

import os

# The learners' progress lines (reporting.progress_line, and the line a restarted learner resumes with) reach the
# job's log uncut. Ray's driver deduplicates worker lines that differ only in their numbers once they come from
# more than one process (a restarted learner, trials of a sweep, or one learner seen from two nodes): it holds
# them back for 5 s and prints only the last with "[repeated Nx across cluster]", so a job's log skipped steps
# (seen: steps 4-22 of a two-node job). Ray reads this when it is imported, which in a driver is from this
# package; a value the user set wins.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"\[[\w -]+\] (step +\d+/|resumed at learner step)")
