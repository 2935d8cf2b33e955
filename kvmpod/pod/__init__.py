"""Pods: what to run (spec), where its state lives (pod directory), and running it (run)."""
