"""placeholder"""
def predict(cfg, run_dir): raise NotImplementedError
