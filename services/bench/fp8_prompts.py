"""Varied prompts for the fp8 agreement benchmark: facts, code, stories, lists, dialogue, maths,
instructions and a few long passages (tens to hundreds of tokens)."""

from __future__ import annotations

_SHORT = [
    "The capital of France is",
    "def fibonacci(n):",
    "Water boils at a temperature of",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n\ndef normalize(matrix):\n    ",
    "Q: What is the largest planet in the solar system?\nA:",
    "The mitochondria is",
    "List five fruits that are red:\n1.",
    "SELECT name, email FROM users WHERE",
    "Dear hiring manager,\n\nI am writing to apply for",
    "In 1969, Neil Armstrong",
    "The quick brown fox",
    "To make a cup of tea, first",
    "#include <stdio.h>\n\nint main(void) {\n",
    "The French word for 'cat' is",
    "Photosynthesis converts sunlight into",
    "User: Can you recommend a good book about history?\nAssistant:",
    "2 + 2 = 4\n3 + 5 = 8\n7 + 6 =",
    "The most important rule of cooking pasta is",
    "Here is a haiku about the ocean:\n",
    "class Stack:\n    def __init__(self):\n",
    "The stock market fell sharply today after",
    "My favorite thing about winter is",
    "Translate to Spanish: 'Good morning, how are you?'\n",
    "The theory of relativity, proposed by Albert Einstein,",
    "A recipe for pancakes:\nIngredients:\n-",
    "<html>\n<head>\n<title>",
    "The main causes of the First World War were",
    "Step 1: Open the terminal.\nStep 2:",
    "She opened the door and saw",
    "The difference between a list and a tuple in Python is",
    "Breaking news: scientists have discovered",
    "{\"name\": \"Alice\", \"age\": 30, \"city\":",
    "Why is the sky blue? The short answer is",
    "git commit -m \"",
    "The human heart has four chambers:",
    "If you want to learn a new language, the best way is to",
]

_LONG = [
    ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined "
     "movable metal type, oil-based ink and a wooden press adapted from wine-making. Before that, books were "
     "copied by hand, which made them rare and expensive. Within fifty years, presses had spread to more than "
     "two hundred cities across Europe, and millions of books were printed. The consequences were enormous:"),
    ("def merge_sort(items):\n    if len(items) <= 1:\n        return items\n    middle = len(items) // 2\n"
     "    left = merge_sort(items[:middle])\n    right = merge_sort(items[middle:])\n"
     "    return merge(left, right)\n\n\n"
     "def merge(left, right):\n    result = []\n    i = j = 0\n"),
    ("Meeting notes, Tuesday. Present: Ana, Ben, Chloe, David. Ana reported that the new onboarding flow cut "
     "support tickets by a third. Ben raised concerns about the database migration planned for next month: the "
     "staging copy took eleven hours and locked two tables. Chloe suggested running it in batches overnight. "
     "David will draft a rollback plan. Action items:"),
    ("The patient is a 54-year-old man who presents with chest pain that started two hours ago while he was "
     "climbing stairs. The pain is pressure-like, radiates to the left arm, and is accompanied by sweating and "
     "shortness of breath. He has a history of hypertension and smokes a pack a day. The first steps are"),
    ("Chapter One. The rain had not stopped for three days, and the river at the edge of town had risen past the "
     "old stone marker that Grandfather Elias always pointed to when he told the story of the great flood. Mara "
     "stood on the porch with her boots already laced, listening to the water. Behind her, the radio crackled"),
    ("Terms of service. By using this website you agree to the following conditions. You may not copy, modify or "
     "distribute any content without written permission. We may change these terms at any time, and continued "
     "use of the site means you accept the changes. Your personal data is handled according to"),
    ("A train leaves station A at 9:00 travelling at 80 km/h. Another train leaves station B, 300 km away, at "
     "10:00 travelling towards A at 100 km/h. To find when they meet, we first compute how far the first train "
     "has gone by 10:00, which is"),
    ("Review: I bought this blender last month and have used it almost every day. It crushes ice easily and the "
     "smoothies come out perfectly smooth. The lid is a little hard to clean and the motor is loud, but for the "
     "price it is excellent. Compared with my old one,"),
    ("The following is a conversation between a helpful assistant and a user.\nUser: I want to start running but "
     "I get tired after five minutes. What should I do?\nAssistant: That is very common when starting out. A good "
     "approach is"),
    ("Abstract. We study the problem of transferring the key-value cache of a transformer between machines during "
     "disaggregated inference. Prefill and decode run on separate workers, so the cache computed for the prompt "
     "must travel over the network before the first decode step. We show that"),
    ("Ingredients: 2 cups flour, 1 teaspoon salt, 1 tablespoon sugar, 1 packet yeast, 3/4 cup warm water, 2 "
     "tablespoons olive oil. Method: Mix the yeast with the warm water and sugar and let it stand for ten minutes "
     "until foamy. Then"),
    ("In economics, inflation is a general increase in the prices of goods and services. When inflation rises, "
     "each unit of currency buys fewer goods. Central banks try to keep inflation low and stable, usually around "
     "two percent a year, by adjusting interest rates. When a central bank raises rates,"),
]

PROMPTS: list[str] = _SHORT + _LONG
