"""vecsearch"""
