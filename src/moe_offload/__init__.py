"""moe-offload: run Mixture-of-Experts models on a GPU that cannot hold them. See README.md."""
