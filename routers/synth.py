"""Template generator for the stage-1 training set: task × topic × voice.

Why it exists: a router trained on ~900 hand-written seed prompts learned their *phrasing* and
routed by topic words ("equations" -> math, "math teacher" -> math) where the *task* says
otherwise. The fix is data in which every task is crossed with every topic and written in many
voices, so that the only signal that separates the categories is the task. Everything here is
written for this project (no public benchmark prompt is copied); the output is deterministic for
a given seed, written to ``routers/data/synth/*.jsonl`` by ``python -m routers.synth`` and checked
by a test to be reproducible.

Labelling rules (docs/taxonomy.md, "task before topic"):
* an explicit persona the model must adopt ("act as", "you are now", "pretend to be") -> roleplay,
  whatever it is then asked (a math teacher explaining fractions is roleplay);
* pulling, classifying, counting, rating or restructuring what is in *given* material -> extraction
  (variable names from equations are extraction);
* composing, editing, proofreading, rewriting prose -> writing (editing a paragraph about physics is
  writing);
* writing, fixing or explaining code, any language, including an algorithm -> coding;
* computing or proving something mathematical -> math; puzzles and logic -> reasoning;
* explaining/discussing knowledge: natural science, medicine, engineering -> stem; history,
  philosophy, economics, law, arts, society -> humanities; everyday chat and advice -> general.

Each record carries ``family`` (which template; templates alternate between two "writers", A and
B, with deliberately different phrasing habits) and ``voice`` (how the surface is rendered), so
``bench/router_crossstyle.py`` can train on some writers/voices and test on the others.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

OUT_DIR = Path(__file__).resolve().parent / "data" / "synth"
SEED = 20261129
PER_TEMPLATE = 20  # records drawn per template

# ---------------------------------------------------------------- subject matter, by domain
SUBJECTS: dict[str, list[str]] = {
    "math": ["the Pythagorean theorem", "prime numbers", "quadratic equations", "derivatives", "integrals",
             "matrices and determinants", "probability of independent events", "geometric series",
             "modular arithmetic", "the binomial theorem", "logarithms", "complex numbers",
             "eigenvalues", "permutations and combinations", "limits", "vectors"],
    "stem": ["cellular respiration", "black holes", "plate tectonics", "the immune system", "DNA replication",
             "quantum entanglement", "climate feedback loops", "semiconductors", "vaccines",
             "nuclear fusion", "the water cycle", "enzymes", "antibiotic resistance", "orbital mechanics",
             "lithium-ion batteries", "neurons and synapses", "volcanoes", "the greenhouse effect",
             "chemical equilibrium", "gravitational waves", "gene therapy", "wind turbine design"],
    "humanities": ["the French Revolution", "Stoic philosophy", "the Silk Road", "inflation and interest rates",
                   "the Renaissance", "the Cold War", "supply and demand", "Confucian ethics",
                   "the printing press", "colonialism in Africa", "impressionist painting", "the Meiji Restoration",
                   "trade unions", "the social contract", "the Ottoman Empire", "minimum wage debates",
                   "existentialism", "the Harlem Renaissance", "the fall of the Berlin Wall", "Greek tragedy",
                   "behavioral economics", "the Magna Carta"],
    "code": ["a REST API", "a linked list", "recursion", "database indexes", "unit tests", "a web scraper",
             "async programming", "a binary search tree", "hash maps", "memory leaks", "a CSV parser",
             "sorting algorithms", "regular expressions", "a login form", "Docker containers"],
    "general": ["my morning routine", "a birthday party for my kid", "moving to a new city", "saving money on groceries",
                "my houseplants", "a weekend trip", "learning to cook", "my new puppy", "a job interview",
                "my neighbour's noisy dog", "running a first marathon", "a wedding toast", "our garden",
                "a family reunion", "a road trip"],
}

# pasted material (each tagged with its domain): paragraphs, equations, reviews, notes, tables, code
MATERIAL: dict[str, list[str]] = {
    "math": [
        "A prime number are a number that have exactly two divisor, one and itself. The number one is not prime "
        "because it only have one divisor.",
        "To solve a quadratic equation you can use the formula x equals minus b plus or minus the square root of "
        "b squared minus four a c, all over two a.",
        "1) 3x^2 + 2xy - sin(z) = 7\n2) e^(k t) = ln(P0) + r/q\n3) a_n = a_(n-1) + d*m",
        "y = 4w^3 - 2v + sqrt(u)\nF = G*m1*m2 / r^2\nA = pi * r^2 + 2*pi*r*h",
        "Problem 4: Let f(x) = x^3 - 6x^2 + 11x - 6. Show that f has three real roots and find them. "
        "Problem 5: The sum of two numbers is 24 and their product is 143. Find the numbers.",
        "Lemma 2. For every integer n >= 1, 7^n - 1 is divisible by 6. Proof: by induction on n, the base "
        "case holds since 7 - 1 = 6; assume 7^k - 1 = 6m, then 7^(k+1) - 1 = 7(6m + 1) - 1 = 42m + 6.",
        "Quiz scores: Ana 78, Ben 91, Chen 85, Dara 62, Eli 91, Fay 70. The teacher computed a mean of 79.5 "
        "and a median of 81.5 for the class.",
    ],
    "stem": [
        "Black holes is regions where gravity are so strong that nothing, not even light, can escapes. They forms "
        "when a massive star collapse at the end of it's life.",
        "The vaccine teach the immune system to recognise a virus by showing it a harmless piece of them, so "
        "the body make antibodies before a real infection happen.",
        "Mitochondria convert glucose and oxygen into ATP through glycolysis, the Krebs cycle and the electron "
        "transport chain. Damaged mitochondria release cytochrome c, which can trigger apoptosis in the cell.",
        "The probe reached Jupiter in July 2016 after a five-year cruise. Its magnetometer found the planet's "
        "field far lumpier than expected, and its microwave radiometer measured ammonia down to 350 km.",
        "Sample 1: pH 4.2, 18 C, dissolved oxygen 6.1 mg/L. Sample 2: pH 7.9, 21 C, dissolved oxygen 8.4 mg/L. "
        "Sample 3: pH 6.5, 19 C, dissolved oxygen 3.2 mg/L, collected below the paper mill outflow.",
        "Patients receiving the new inhibitor showed a 23% drop in LDL cholesterol after 12 weeks, compared "
        "with 4% on placebo; mild muscle pain was reported by 6% of the treatment group.",
        "Our greenhouse trial: tomatoes under red LEDs grew 14% taller than under white light after six weeks, "
        "but fruit set was two weeks later and leaf chlorophyll readings were 8% lower.",
    ],
    "humanities": [
        "The french revolution begun in 1789 when the people of Paris was angry about bread prices and the king "
        "spending, and it lead to the end of the monarchy.",
        "Stoicism teach that we cant control what happen to us but we can control how we reacts, which is why "
        "Marcus Aurelius wrote his meditations every nights.",
        "In 1848 revolutions broke out in France, the German states, the Austrian Empire and Italy. Liberals "
        "demanded constitutions and a free press, but by 1849 most of the old monarchies had regained control.",
        "Seneca wrote that we suffer more in imagination than in reality. For the Stoics, what disturbs us is "
        "not events themselves but our judgements about them, which remain within our power.",
        "The central bank raised its policy rate by 0.75 points in March, citing core inflation of 5.4%. "
        "Unemployment stayed at 3.6%, while GDP growth slowed to 1.1% on an annual basis.",
        "The museum's new wing shows Monet, Morisot and Pissarro side by side, with letters in which Morisot "
        "complains that critics praise her 'feminine charm' rather than her brushwork.",
        "Under the treaty signed in 1648, the princes of the empire gained the right to choose their own "
        "religion, and Switzerland and the Dutch Republic were recognised as independent.",
    ],
    "code": [
        "def avg(xs):\n    total = 0\n    for i in range(len(xs) + 1):\n        total += xs[i]\n    return total / len(xs)",
        "SELECT c.name, COUNT(o.id)\nFROM customers c LEFT JOIN orders o ON o.customer_id = c.id\nGROUP BY c.name\nHAVING COUNT(o.id) > 5;",
        "function debounce(fn, ms) {\n  let t;\n  return (...args) => { clearTimeout(t); t = setTimeout(() => fn(...args), ms); };\n}",
        "2024-06-01 12:00:03 ERROR db.pool: timeout after 30s (host=10.0.0.7)\n2024-06-01 12:00:04 WARN api: retrying "
        "request id=8841\n2024-06-01 12:00:09 INFO api: request id=8841 ok in 5012 ms",
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def pop(self):\n        return self.items.pop(0)",
    ],
    "general": [
        "Hey all! Potluck is Saturday at 6 at Maria's place (14 Elm St). Tom brings lasagna, Priya salad, "
        "Jake drinks; someone please bring dessert. Parking on the street after 5 is free. Call 555-0143 if lost.",
        "Review 1: The blender is loud but crushes ice in seconds, five stars. Review 2: Lid cracked after a week "
        "and support never replied. Review 3: Fine for smoothies, a bit pricey for what it is.",
        "Dear residents, the water will be shut off on Tuesday from 9:00 to 13:00 for pipe repairs in blocks "
        "B and C. Please store water in advance. Questions go to the building office, room 12.",
        "Flight LH 1234 from Berlin to Lisbon departs 07:45 from gate B12 on 3 May; check-in closes at 07:05. "
        "Hotel Miramar, 2 nights, booking ref QX88T, breakfast included.",
        "me and my husband was thinking to visit the coast this summer but the prices is crazy, "
        "so maybe we stays home and do day trips instead, the kids dont mind much.",
        "I've been so tired lately. work is crazy, the kids have colds and honestly i havent been to the gym "
        "in weeks. my sister says i should try meal prepping on sundays but idk where to start",
    ],
}

DOMAINS = list(SUBJECTS)
LANGS = ["Python", "Rust", "Go", "JavaScript", "TypeScript", "Java", "C++", "C#", "Kotlin", "Ruby", "SQL", "Bash"]
ALGOS = ["Dijkstra's shortest path algorithm", "binary search", "a function that merges k sorted lists",
         "an LRU cache", "merge sort", "a trie with insert and prefix search", "the Sieve of Eratosthenes",
         "a function that checks whether a string is a palindrome", "breadth-first search on a grid",
         "a rate limiter using a token bucket", "the longest common subsequence of two strings",
         "a function that returns the n-th Fibonacci number in O(log n)", "topological sort",
         "a function that finds duplicate files by content hash", "matrix multiplication",
         "a function computing the greatest common divisor", "a JSON pretty-printer", "quickselect",
         "a function that rotates a matrix by 90 degrees", "an event emitter"]
PERSONAS = {
    "math": ["a math teacher", "a patient algebra tutor", "Pythagoras", "a famous mathematician", "a statistics professor"],
    "stem": ["a marine biologist", "Marie Curie", "an astronaut on the ISS", "a volcanologist", "a doctor in an ER",
             "Albert Einstein", "a chemistry lab instructor"],
    "humanities": ["a Roman senator", "Socrates", "a medieval monk", "an economist at a central bank",
                   "Napoleon", "a museum guide", "a 1920s newspaper reporter"],
    "code": ["a senior software engineer interviewing me", "a grumpy sysadmin", "Linus Torvalds",
             "a database administrator", "a coding bootcamp instructor"],
    "general": ["my best friend", "a pirate captain", "a talking cat", "a game show host", "a fitness coach",
                "a detective in 1940s Los Angeles", "a tour guide in Lisbon", "a travel agent", "Sherlock Holmes"],
}

# ---------------------------------------------------------------- templates per category
# Each template: (domains it applies to, format string). Slots: {subj} subject, {mat} pasted material,
# {lang}, {algo}, {persona}, {n}, numbers {a} {b} {c}. Templates alternate writers A/B by index.

T = list[tuple[tuple[str, ...], str]]
ALL = tuple(DOMAINS)

EXTRACTION: T = [
    (ALL, "Extract every number that appears in the text below and list them with what they refer to.\n\n{mat}"),
    (ALL, "pull out all the names (people, places, organisations) from this:\n{mat}"),
    (("math",), "Pull the formulas out of the notes below and list the symbols each formula uses. No solving.\n\n{mat}"),
    (ALL, "Read the passage and return a JSON object with the keys who, what, when and where.\n\n{mat}"),
    (ALL, "{mat}\n\nFrom the text above, list only the dates and times mentioned, in ISO format."),
    (ALL, "Identify the main claim of the following paragraph and quote the sentence that states it.\n\n\"{mat}\""),
    (("general",), "Tag each review below as positive, negative or mixed and name the product feature it complains about or praises.\n\n{mat}"),
    (ALL, "Turn this into a table with one row per item mentioned:\n\n{mat}"),
    (ALL, "Which sentence of the following text contains the most figures? Quote it and list the figures.\n\n{mat}"),
    (ALL, "{mat}\n\nwhat are the key facts in that? bullet points only, no commentary"),
    (("math",), "Below is an excerpt from my homework sheet. Don't solve anything, just list the problems and the quantities each one gives.\n\n{mat}"),
    (ALL, "Classify the following text as news, opinion, instructions or personal message, and give the label only.\n\n{mat}"),
    (("code",), "From this snippet, extract the names of all functions, variables and tables that are referenced.\n\n{mat}"),
    (ALL, "Here is a note I received:\n\"{mat}\"\nPlease extract any action items and who is responsible for each."),
    (ALL, "Summarise the following in exactly two sentences, keeping every figure it mentions.\n\n{mat}"),
    (ALL, "{mat}\n\nQuestion about the text above: which words in it are technical terms? List them, nothing else."),
    (ALL, "Fill in this template from the passage: Topic: ... | People: ... | Numbers: ... | Places: ...\n\n{mat}"),
    (ALL, "Is the following passage written in the past, present or future tense? Quote one verb as evidence.\n\n{mat}"),
    (("stem", "humanities"), "Make an index of this passage: every proper noun and every date, each with the sentence number it occurs in.\n\n{mat}"),
]

WRITING: T = [
    (ALL, "fix the grammar in this para pls, keep it my voice:\n\n{mat}"),
    (ALL, "Write a short blog post about {subj} for a general audience. Keep it engaging and under 300 words."),
    (ALL, "Can you proofread this? Only fix spelling and punctuation, don't change my wording.\n\n{mat}"),
    (ALL, "Compose a poem about {subj}, four stanzas, with a hopeful ending."),
    (ALL, "Rewrite this text so it sounds more formal, as if for an official report:\n\n{mat}"),
    (ALL, "Give our newsletter section on {subj} a title and a two-sentence intro that makes people want to read on."),
    (ALL, "Draft an email to the parents of my class announcing next month's field trip, which is about {subj}."),
    (ALL, "Make this shorter and punchier, half the length at most:\n\n{mat}"),
    (ALL, "Write a 400-word short story in which a grandmother and her grandson argue about {subj}."),
    (ALL, "Help me write a persuasive opening paragraph for an essay arguing that everyone should learn about {subj}."),
    (ALL, "Please improve the flow of this paragraph from my thesis without changing its meaning:\n\n{mat}"),
    (ALL, "I need a tweet thread (5 tweets) announcing our new podcast episode on {subj}."),
    (ALL, "Write the wedding-speech joke section for my friend, who is a huge nerd about {subj}."),
    (ALL, "Translate the tone of this to be friendlier and more casual, keep the facts:\n\n{mat}"),
    (ALL, "Write a limerick about {subj}."),
    (ALL, "{mat}\n\nCan you clean up the writing above? Grammar, spelling, sentence flow. Same content."),
    (ALL, "Copy-edit the following for a school newsletter, keeping it the same length:\n\n{mat}"),
    (ALL, "My English is not good. Please correct my text and make it sound natural:\n{mat}"),
    (ALL, "Rephrase this paragraph in plain language for a ten-year-old reader, without adding facts:\n\n{mat}"),
    (ALL, "Polish this paragraph so it could go in a published book:\n\n{mat}"),
    (ALL, "Turn these notes into one well-written paragraph:\n\n{mat}"),
    (ALL, "Write a cover letter for a junior position at a museum; mention my volunteer work on {subj}."),
]

ROLEPLAY: T = [
    (ALL, "Act as {persona}. I will ask you questions about {subj} and you answer in character. First question: where should I start?"),
    (ALL, "Pretend you are {persona} for the rest of this conversation. Speak the way they would. Tell me what you think of {subj}."),
    (ALL, "You are now {persona}. Stay in character no matter what. I walk up to you and ask about {subj}."),
    (ALL, "Let's role-play: you're {persona} and I'm a curious student. Explain {subj} to me the way you would in person."),
    (ALL, "take on the role of {persona}. dont break character. what's your take on {subj}?"),
    (ALL, "I want you to act as {persona}. I will describe problems with {subj} and you respond only as that character would."),
    (ALL, "Embody {persona}. In your voice and with your mannerisms, give me a pep talk about {subj}."),
    (ALL, "Speak to me as {persona} would, in first person: what does a typical day with {subj} look like for you?"),
    (ALL, "From now on you are {persona}. I am a nervous beginner. Walk me through {subj} and react to my questions in character."),
    (ALL, "Please assume the role of {persona}. Respond to this in character: \"I think {subj} is overrated.\""),
    (ALL, "Play {persona} in a short interview. I'm the journalist. My first question is about {subj}."),
    (ALL, "Be {persona} and write me a letter, in character, about your experiences with {subj}."),
]

CODING: T = [
    (("code", "math"), "Implement {algo} in {lang}."),
    (ALL, "Write a {lang} script that downloads nothing, just parses a local JSON file of {subj} records and prints a summary table."),
    (("code",), "There's a bug in this code, can you find and fix it?\n\n{mat}"),
    (("code", "math"), "How would I write {algo} in {lang}? Please include tests."),
    (("code",), "Explain line by line what this code does and whether it could be faster:\n\n{mat}"),
    (ALL, "Make a single-page React component with a search box that filters a hard-coded list of {subj} entries."),
    (("code", "math"), "{lang}: {algo}, with O(n log n) time or better if possible"),
    (ALL, "Build a small command-line tool in {lang} that stores and searches my notes on {subj}. Give me the code."),
    (("code",), "refactor this to be more idiomatic and add type hints\n\n{mat}"),
    (("math",), "Write a {lang} function that computes {subj_code} and returns the result; handle invalid input."),
    (("code", "math"), "My interview is tomorrow. Could you code {algo} in {lang} and explain its complexity?"),
    (ALL, "Design a database schema and the SQL queries for an app that tracks {subj}."),
    (("code",), "Convert this to {lang}, keeping the behaviour identical:\n\n{mat}"),
    (("code", "math"), "write unit tests in {lang} for {algo}"),
]

MATH: T = [
    (("math",), "Solve for x: {a}x + {b} = {c}x - {d}."),
    (("math",), "A shop sells pens at ${a} each and notebooks at ${b} each. Sam buys {c} items and pays ${e}. How many notebooks did he buy?"),
    (("math",), "What is the probability of rolling a total of at least {f} with two fair dice?"),
    (("math",), "A rectangle has a diagonal of {a}{b} cm and one side of {c} cm. How long is the other side?"),
    (("math",), "What is the last digit of {a}^{g}{h}? Explain the pattern you use."),
    (("math",), "Prove that the sum of the first n odd numbers is n^2."),
    (("math",), "A savings account pays {h}% interest compounded yearly. How many years until ${a}000 doubles?"),
    (("math",), "Compute the derivative of f(x) = {a}x^3 - {b}x^2 + sin(x) and find where it equals zero."),
    (("math",), "integrate x^{h} * e^x dx, step by step please"),
    (("math",), "How many ways can {f} people sit around a round table if two of them refuse to sit together?"),
    (("math",), "Find all integer solutions of x^2 - y^2 = {c}{a}."),
    (("math",), "If a car travels {a}0 km at {b}0 km/h and returns at {c}0 km/h, what is its average speed for the whole trip?"),
    (("math",), "Find the eigenvalues of the matrix [[{a}, {b}], [{b}, {c}]]."),
    (("math",), "A bag has {a} red and {b} blue marbles. Two are drawn without replacement. What is the chance both are red?"),
    (("math",), "Is {p} prime? Show how you check."),
    (("math",), "Evaluate the sum 1/(1*2) + 1/(2*3) + ... + 1/({g}*{gg})."),
]

REASONING: T = [
    (("general",), "In a queue, {name1} is {a}th from the front and {b}th from the back. How many people are in the queue?"),
    (("general",), "{name1} is taller than {name2}. {name2} is taller than {name3}. Is {name3} taller than {name1}? Explain."),
    (("general",), "Premise one: every {name1} is heavier than any {name2}. Premise two: this {name3} is lighter than some {name2}. Can the {name3} be a {name1}? Argue it out."),
    (("general",), "Spot the odd one out and explain the rule the others share: {odd}"),
    (("general",), "{name1}'s only uncle's father is {name2}'s grandfather, and {name2} has no cousins. What could the relation between {name1} and {name2} be?"),
    (("general",), "Five houses in a row are painted different colours. The red one is left of the green one, the blue one is at an end, and the green one is in the middle. Which positions can the red house take?"),
    (("general",), "If it takes {a} machines {a} minutes to make {a} widgets, how long do {b}0 machines need for {b}0 widgets?"),
    (("general",), "If all {name1}s are {name2}s and some {name2}s are {name3}s, does it follow that some {name1}s are {name3}s?"),
    (("general",), "Three boxes are labelled apples, oranges and mixed, and every label is wrong. You may take one fruit from one box. How do you fix the labels?"),
    (("general",), "A locked room has one light bulb inside and three switches outside. You may enter once. How do you find which switch controls the bulb?"),
    (("general",), "Five friends sit in a row. {name1} is left of {name2}, {name3} is at one end, and {name2} is not next to {name3}. Who could be in the middle?"),
    (("general",), "There are {a} birds on a wire. A hunter shoots one. How many are left? Think carefully."),
    (("general",), "Which conclusion follows? 'No reptiles have fur. Some pets are reptiles.' a) Some pets have no fur b) All pets have fur c) No pets have fur"),
    (("general",), "A clock shows 3:15. What is the angle between the hour and minute hands, and why isn't it zero?"),
    (("general",), "Knights always tell the truth and knaves always lie. {name1} says '{name2} is a knave.' {name2} says 'we are both knights.' Who is what?"),
]

STEM: T = [
    (("stem",), "Explain {subj} in simple terms. What are the main stages or ideas?"),
    (("stem",), "How does {subj} actually work? I've never understood it."),
    (("stem",), "What's the current scientific understanding of {subj}, and what are the open questions?"),
    (("stem",), "Describe {subj} and give a real-world example where it matters."),
    (("stem",), "why does {subj} matter for everyday life? keep it short"),
    (("stem",), "Compare {subj} with {subj2}: how are they related?"),
    (("stem",), "Why does a spinning ice skater speed up when she pulls her arms in? Use the physics, not just the intuition."),
    (("stem",), "What would happen if {subj} suddenly stopped working? Walk me through the consequences."),
    (("stem",), "What is going on at the molecular level when {chem}? Which observations show it?"),
    (("stem",), "How do engineers keep tall buildings from swaying too much in strong wind?"),
    (("stem",), "I'm a nurse and keep hearing about {subj}. Can you give me the key facts I should know?"),
    (("stem",), "Which experiments first convinced scientists about {subj}, and what did they measure?"),
    (("stem",), "What are the biggest misconceptions people have about {subj}?"),
]

HUMANITIES: T = [
    (("humanities",), "What were the main causes and consequences of {subj}?"),
    (("humanities",), "Discuss {subj} and its impact on society today."),
    (("humanities",), "Explain {subj} as if to a high-school student, with one concrete example."),
    (("humanities",), "How do historians and philosophers disagree about {subj}?"),
    (("humanities",), "Is there a link between {subj} and {subj2}, or is that a stretch?"),
    (("humanities",), "What primary sources would a student use to research {subj}, and what are their biases?"),
    (("humanities",), "what's the big deal about {subj}? why do people still talk about it"),
    (("humanities",), "Who were the main critics of {subj} at the time, and what did they object to?"),
    (("humanities",), "Compare how {subj} is understood in Europe and in East Asia."),
    (("humanities",), "How has the popular view of {subj} changed over the last fifty years?"),
    (("humanities",), "What are the ethical arguments for and against positions connected to {subj}?"),
    (("humanities",), "Was {subj} inevitable, or could things have gone differently? Give the strongest case for each side."),
    (("humanities",), "How would a Marxist and a liberal economist each interpret {subj}?"),
]

GENERAL: T = [
    (("general",), "hey, any tips for {subj}?"),
    (("general",), "I'm a bit stressed about {subj}. What would you suggest I do first?"),
    (("general",), "What's a good gift idea for someone who loves {subj2}?"),
    (("general",), "Can you recommend a few movies for a cozy night in? We liked {movie}."),
    (("general",), "how are you today? tell me something fun"),
    (("general",), "I need ideas for {subj}, nothing too expensive."),
    (("general",), "Is it normal to feel nervous about {subj}?"),
    (("general",), "what should I have for dinner tonight, I have {food} in the fridge"),
    (("general",), "Quick question: what's the best way to keep {subj2} from getting out of hand?"),
    (("general",), "Can you help me plan {subj}? Just a rough checklist."),
    (("general",), "thanks for the help earlier! one more thing - what do you think about {subj}?"),
    (("general",), "Tell me a joke about {subj2}."),
]

CATEGORIES: dict[str, T] = {
    "extraction": EXTRACTION, "writing": WRITING, "roleplay": ROLEPLAY, "coding": CODING, "math": MATH,
    "reasoning": REASONING, "stem": STEM, "humanities": HUMANITIES, "general": GENERAL,
}

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo", "Kemi", "Lior", "Mara", "Nils"]
THINGS = ["oranges", "apples", "bananas", "plums", "cats", "dogs", "blips", "zorks", "wugs"]
ODD = ["spoon, fork, plate, knife", "violin, cello, trumpet, viola", "Mars, Venus, Moon, Jupiter",
       "oak, pine, rose, birch", "hammer, saw, nail, drill", "Paris, Rome, Spain, Berlin"]
CHEM = ["a match is struck", "iron rusts in moist air", "methane burns in oxygen",
        "sodium reacts with water", "baking soda meets vinegar"]
MOVIES = ["Paddington 2", "Amelie", "The Grand Budapest Hotel", "Spirited Away", "Knives Out"]
FOOD = ["eggs, spinach and feta", "leftover rice and some chicken", "tofu, peppers and noodles", "potatoes and cheese"]
SUBJ_CODE = ["the n-th prime", "the determinant of a 3x3 matrix", "the binomial coefficient C(n, k)",
             "the roots of a quadratic", "the area of a polygon from its vertices", "the mean and standard deviation of a list"]

# ---------------------------------------------------------------- voices (surface renderings)


def _lower_terse(s: str, r: random.Random) -> str:
    s = s.replace("Please ", "").replace("please ", "").replace("Can you ", "").replace("Could you ", "")
    return s[0].lower() + s[1:] if s else s


def _polite(s: str, r: random.Random) -> str:
    pre = r.choice(["Hi! ", "Hello, ", "Good morning. ", "Hey there, ", ""])
    post = r.choice([" Thank you so much!", " Thanks in advance.", " I'd really appreciate it.", " Cheers!"])
    return pre + s + post


def _context(s: str, r: random.Random) -> str:
    ctx = r.choice([
        "I'm preparing material for a workshop next week.", "My boss asked me for this by Friday.",
        "This is for a school assignment, so accuracy matters.", "Long day, sorry if this is a weird ask.",
        "I'm a retired engineer who likes to keep learning.", "We're a small team of three working on this.",
        "Context: I teach evening classes for adults.", "I've been stuck on this for an hour.",
    ])
    return ctx + " " + s if r.random() < 0.5 else s + "\n\n" + ctx


def _nonnative(s: str, r: random.Random) -> str:
    s = s.replace(" the ", " ").replace("Can you", "Can you please to").replace("I'm", "I am")
    return r.choice(["Hello sir, ", "Dear, ", "Please, ", ""]) + s + r.choice([" Thanks.", " Kindly help.", ""])


def _constraints(s: str, r: random.Random) -> str:
    extra = r.choice([" Keep it under 150 words.", " Use bullet points.", " Be concise.",
                      " Answer in a friendly tone.", " Show your work.", " Give me the answer first, then details.",
                      " Format the answer in Markdown."])
    return s + extra


def _system(s: str, r: random.Random) -> str:
    # a neutral assistant framing is NOT a persona: the category stays the task's
    return r.choice(["You are a helpful assistant. ", "You are an AI assistant. Answer carefully.\n\n",
                     "System: be accurate and brief.\nUser: "]) + s


VOICES: dict[str, Callable[[str, random.Random], str]] = {
    "plain": lambda s, r: s, "terse": _lower_terse, "polite": _polite, "context": _context,
    "nonnative": _nonnative, "constraints": _constraints, "system": _system,
}


def _fill(tpl: str, domain: str, r: random.Random) -> str:
    a, b, c = r.randint(2, 9), r.randint(2, 9), r.randint(2, 9)
    g = r.randint(5, 19)
    subj_pool = SUBJECTS[domain]
    vals = {
        "subj": r.choice(subj_pool), "subj2": r.choice(SUBJECTS[r.choice(DOMAINS)]), "mat": r.choice(MATERIAL[domain]),
        "lang": r.choice(LANGS), "algo": r.choice(ALGOS), "persona": r.choice(PERSONAS[domain]),
        "a": a, "b": b, "c": c, "d": r.randint(1, 20), "e": a * c + r.randint(1, 9), "f": r.randint(4, 11),
        "g": g, "gg": g + 1, "h": r.randint(1, 4), "p": r.choice([91, 97, 221, 223, 1001, 1009, 143, 127]),
        "ordinal": r.choice(["second", "third", "last"]), "name1": r.choice(NAMES), "name2": r.choice(NAMES),
        "name3": r.choice(NAMES), "odd": r.choice(ODD), "chem": r.choice(CHEM), "movie": r.choice(MOVIES),
        "food": r.choice(FOOD), "subj_code": r.choice(SUBJ_CODE),
    }
    if "{name1}s" in tpl:
        t = r.sample(THINGS, 3)
        vals.update(name1=t[0].rstrip("s"), name2=t[1].rstrip("s"), name3=t[2].rstrip("s"))
    return tpl.format(**vals)


def generate(seed: int = SEED, per_template: int = PER_TEMPLATE) -> list[dict]:
    """All synthetic records: ``{prompt, category, topic, family, writer, voice}``, deterministic."""
    r = random.Random(seed)
    voices = list(VOICES)
    out: list[dict] = []
    seen: set[str] = set()
    for cat, templates in CATEGORIES.items():
        for i, (domains, tpl) in enumerate(templates):
            writer = "A" if i % 2 == 0 else "B"
            for _ in range(per_template):
                domain = r.choice(domains)
                voice = r.choice(voices)
                prompt = VOICES[voice](_fill(tpl, domain, r), r).strip()
                if prompt in seen:
                    continue
                seen.add(prompt)
                topic = {"code": "coding"}.get(domain, domain)
                out.append({"prompt": prompt, "category": cat, "topic": topic, "family": f"{cat}/{i}",
                            "writer": writer, "voice": voice})
    return out


def write(out_dir: Path = OUT_DIR, seed: int = SEED) -> list[Path]:
    """Write one JSONL file per category (sorted keys, ASCII) and return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    recs = generate(seed)
    paths = []
    for cat in CATEGORIES:
        p = out_dir / f"{cat}.jsonl"
        p.write_text("".join(json.dumps(x, sort_keys=True) + "\n" for x in recs if x["category"] == cat))
        paths.append(p)
    return paths


if __name__ == "__main__":  # pragma: no cover
    for p in write():
        print(p)
