"""fedavg"""
