"""Term lists for the bias scan (`balance` step): category -> group -> lower-case words or two-word
phrases. They count mentions, not identity: a record that says "the white house" counts once for
`ethnicity/white`. The lists follow the groups of common fairness audits (the gender word lists of
Bolukbasi et al. 2016 and Zhao et al. 2018, HolisticBias's axes, Smith et al. 2022) in a compact form;
`balance.terms` in the config replaces or extends them.
"""

from __future__ import annotations

DEMOGRAPHIC_TERMS: dict[str, dict[str, tuple[str, ...]]] = {
    "gender": {
        "male": ("he", "him", "his", "himself", "man", "men", "boy", "boys", "male", "males", "father", "fathers",
                 "dad", "son", "sons", "brother", "brothers", "husband", "husbands", "uncle", "nephew", "king",
                 "prince", "mr", "sir", "gentleman", "gentlemen", "grandfather", "boyfriend", "masculine"),
        "female": ("she", "her", "hers", "herself", "woman", "women", "girl", "girls", "female", "females",
                   "mother", "mothers", "mom", "daughter", "daughters", "sister", "sisters", "wife", "wives", "aunt",
                   "niece", "queen", "princess", "mrs", "ms", "madam", "lady", "ladies", "grandmother", "girlfriend",
                   "feminine"),
        "nonbinary": ("nonbinary", "non-binary", "genderqueer", "transgender", "trans"),
    },
    "ethnicity": {
        "black": ("black", "african american", "african americans", "african"),
        "white": ("white", "caucasian", "caucasians", "european", "europeans"),
        "asian": ("asian", "asians", "chinese", "japanese", "korean", "indian", "vietnamese", "filipino"),
        "hispanic": ("hispanic", "hispanics", "latino", "latina", "latinos", "latinx", "mexican"),
        "middle eastern": ("arab", "arabs", "middle eastern", "persian", "iranian"),
        "indigenous": ("native american", "native americans", "indigenous", "aboriginal", "first nations"),
    },
    "religion": {
        "christian": ("christian", "christians", "christianity", "church", "catholic", "protestant", "bible"),
        "muslim": ("muslim", "muslims", "islam", "islamic", "mosque", "quran"),
        "jewish": ("jewish", "jew", "jews", "judaism", "synagogue", "torah"),
        "hindu": ("hindu", "hindus", "hinduism", "temple"),
        "buddhist": ("buddhist", "buddhists", "buddhism"),
        "sikh": ("sikh", "sikhs", "sikhism"),
        "atheist": ("atheist", "atheists", "atheism", "agnostic"),
    },
    "age": {
        "young": ("young", "youth", "teen", "teens", "teenager", "teenagers", "child", "children", "kid", "kids",
                  "adolescent", "baby", "babies", "toddler"),
        "old": ("old", "elderly", "senior", "seniors", "aged", "retiree", "retirees", "grandparent",
                "grandparents", "pensioner", "older"),
    },
}

# Pronoun ratios per label; "they" is reported but not a gender group (it is mostly plural).
PRONOUNS: dict[str, tuple[str, ...]] = {
    "he": ("he", "him", "his", "himself"),
    "she": ("she", "her", "hers", "herself"),
    "they": ("they", "them", "their", "theirs", "themselves"),
}
