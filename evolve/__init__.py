"""evolve: config, CLI, the ask/tell search loop, executors, resume, reports and export."""
