"""Optional fused CPU kernels for the decode hot path (built on first use; torch code is the fallback)."""
