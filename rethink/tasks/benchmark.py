"""placeholder"""
def benchmark(cfg, run_dir): raise NotImplementedError
