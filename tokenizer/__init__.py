"""unitok.tokenizer"""
