"""hearth.controller"""
