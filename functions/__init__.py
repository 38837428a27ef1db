"""hearth.functions"""
