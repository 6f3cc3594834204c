"""After stage 2: the trained adaptor run as users run it (eval mode, generate) and scored offline.

    generate.py  captions and answers from soft prompts through the frozen LLM
    evaluate.py  eval caption / vqa / retrieval: predictions, metrics.json and their fingerprints
    score.py     score caption / vqa: any system's predictions against the data, with eval's metric code
    compare.py   tables that put runs side by side, with ceilings and base rates
"""
