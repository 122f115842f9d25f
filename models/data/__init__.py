"""Data: COCO-format datasets from the config and their checks, the mapper, the resumable
training stream, and the synthetic shapes of the demo."""
