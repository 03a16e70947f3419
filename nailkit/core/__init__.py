"""Plumbing every stage stands on: paths, errors, atomic files and the artifact cache, child processes, the offline
switch, output-folder safety, input validation, the CPU/hardware probe, the import-order trap and the notebook runner."""
