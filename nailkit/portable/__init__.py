"""The numpy-only files copied verbatim into every bundle: preprocess, postprocess, io_contract (what each output means),
the GPU target's host chain (gpu_chain) and run_bundle. They import each other flat inside a bundle."""
