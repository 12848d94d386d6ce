"""placeholder"""
def evaluate(cfg, run_dir): raise NotImplementedError
