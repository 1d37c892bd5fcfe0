# CUDA sources loaded by sparsevox.cuda.cuda_loader; this file only makes the folder a package for its data.
