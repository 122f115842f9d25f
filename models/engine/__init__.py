"""Training machinery around detectron2's: the mixed-precision trainer, launching processes
(GPUs, CPU processes, torchrun), exact resume, and SyncBN for CPU processes."""
