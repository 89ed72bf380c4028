"""Types shared by every layer of the engine, at the bottom of the import graph (they import
nothing of graphwise but SamplingParams)."""
