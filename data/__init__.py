"""unitok.data"""
