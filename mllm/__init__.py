"""unitok.mllm"""
