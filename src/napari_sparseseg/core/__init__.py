"""The engine: arrays in, arrays and progress events out. Imports neither Qt nor napari."""
