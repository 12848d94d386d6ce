"""placeholder"""
def train(cfg, run_dir): raise NotImplementedError
