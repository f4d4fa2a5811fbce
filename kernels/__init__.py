"""Triton kernels (importable as metassl_fast.kernels); each file opens with its math and limits."""
