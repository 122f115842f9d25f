"""The paper's modules: the conv stem, the partially observing MAE encoder, the MAE decoder
completion, the MIMDet backbone that composes them, Benchmarking-ViT, and fixed position tables."""
