"""Process plumbing of the ranks, apart from the ML code: launch, rank guard, parent death, the agent link,
telemetry sinks, self-check, fault injection, and the run directory's paths."""
