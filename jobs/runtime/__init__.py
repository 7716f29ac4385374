"""What every job runs on: the worker pool (Ray or in-process), the workers that own a model, OUT's
storage (atomic files, verified shards, the manifest), the lock (one driver per OUT), signals, and what a
stopped job prints (`resumable`)."""
