"""hearth.proxies"""
