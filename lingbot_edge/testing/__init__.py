"""testing: fixtures and data generators (tiny checkpoints, toy scenes, golden makers) for tests and benchmarks.

Nothing in the runtime layers imports this package.
"""
