"""The tag that ties a practice's run to the batch run that executes it.

`practice_sync_batch` (`schedules.jobs`) executes each practice's `practice_sync` run inside its own
process and tags that run `nvc/batch` with the batch's run id. The Kubernetes run launcher
(`resources.k8s_launcher`) reads the tag to judge such a run by its batch's pod. The tag lives here,
in a module that imports nothing, so the launcher, which the daemon and the webserver load without
the code location, does not import the jobs.
"""

BATCH_TAG = "nvc/batch"  # on each practice's run: the batch run that executed it
