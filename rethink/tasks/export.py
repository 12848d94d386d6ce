"""placeholder"""
def export(cfg, run_dir): raise NotImplementedError
