"""unitok.eval"""
