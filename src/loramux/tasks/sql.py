"""Text-to-SQL over one fixed table: templated questions -> one canonical SQLite query.

Schema (implicit: the adapter learns it, the prompt only names the table):
``employees(name TEXT, department TEXT, city TEXT, salary INTEGER, age INTEGER)``.
Each intent has several training phrasings and one held-out phrasing; departments, cities and
numbers of the held-out split never occur in training.
"""
from __future__ import annotations

import random

from .core import EXTRA_TRAIN_PLACES, Pools, Task, pick, pick_or_invent, split_every

DEPARTMENTS = split_every((
    "Sales", "Marketing", "Engineering", "Finance", "Legal", "Support", "Research", "Design",
    "Operations", "Logistics", "Procurement", "Security", "Training", "Quality", "Facilities",
    "Compliance", "Analytics", "Payroll", "Recruiting", "Testing", "Editorial", "Catering",
    "Purchasing", "Audit", "Strategy", "Maintenance", "Publishing", "Treasury", "Hardware", "Software",
), 3)
CITIES = split_every((
    "Paris", "London", "Madrid", "Berlin", "Rome", "Vienna", "Oslo", "Lisbon", "Dublin", "Prague",
    "Athens", "Warsaw", "Zurich", "Milan", "Munich", "Brussels", "Budapest", "Hamburg", "Seville",
    "Porto", "Stockholm", "Helsinki", "Copenhagen", "Amsterdam", "Lyon", "Geneva", "Krakow", "Riga",
    "Naples", "Valencia", "Antwerp", "Bergen",
), 3)
CITIES = Pools(CITIES.train + tuple(c for c in EXTRA_TRAIN_PLACES if c not in CITIES.train + CITIES.heldout),
               CITIES.heldout)
DEPARTMENTS = Pools(DEPARTMENTS.train + tuple(d for d in (
    "Accounting", "Billing", "Customer", "Delivery", "Events", "Export", "Import", "Insurance", "Investment",
    "Lending", "Media", "Networking", "Planning", "Pricing", "Printing", "Production", "Property", "Radio",
    "Retail", "Sourcing", "Sport", "Taxes", "Trading", "Transport", "Travel", "Warehouse", "Wholesale", "Video",
) if d not in DEPARTMENTS.train + DEPARTMENTS.heldout), DEPARTMENTS.heldout)
AGES = split_every(tuple(range(20, 66)), 3)
SALARIES = split_every(tuple(range(30000, 150001, 2500)), 3)
INSTRUCTION = "SQL for the employees table: "  # the columns are the adapter's to know (short prompts train faster)

# (SQL with {d}/{c}/{n}/{s} slots, training phrasings, held-out phrasings)
INTENTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("SELECT name FROM employees WHERE department = '{d}';",
     ("List the names of employees in the {d} department.", "Who works in {d}?",
      "Show everyone in the {d} department.", "Names of all {d} employees?"),
     ("Give me the names of the people in {d}.", "Which staff members belong to {d}?")),
    ("SELECT COUNT(*) FROM employees WHERE city = '{c}';",
     ("How many employees are in {c}?", "Count the employees based in {c}.",
      "Number of employees working in {c}?", "How many people work in {c}?"),
     ("What is the headcount in {c}?", "Tell me how many staff are located in {c}.")),
    ("SELECT name FROM employees WHERE age > {n};",
     ("Which employees are older than {n}?", "List employees over {n} years old.",
      "Names of employees whose age is above {n}.", "Who is older than {n}?"),
     ("Show the names of staff aged more than {n}.", "Find everyone above the age of {n}.")),
    ("SELECT AVG(salary) FROM employees WHERE department = '{d}';",
     ("What is the average salary in {d}?", "Average salary of the {d} department?",
      "Compute the mean salary for {d}.", "How much does {d} pay on average?"),
     ("Tell me the average pay in the {d} department.", "Mean pay of {d} staff?")),
    ("SELECT name FROM employees WHERE salary > {s};",
     ("Who earns more than {s}?", "List employees with a salary above {s}.",
      "Names of employees paid over {s}.", "Which employees make more than {s}?"),
     ("Find the names of people whose salary exceeds {s}.", "Show staff earning over {s}.")),
    ("SELECT MAX(salary) FROM employees WHERE city = '{c}';",
     ("What is the highest salary in {c}?", "Maximum salary of employees in {c}?",
      "Top salary paid in {c}?", "What is the largest salary in {c}?"),
     ("Show the biggest salary among {c} employees.", "Highest pay of anyone in {c}?")),
    ("SELECT name FROM employees WHERE department = '{d}' AND city = '{c}';",
     ("Who works in {d} in {c}?", "List {d} employees based in {c}.",
      "Names of employees in the {d} department located in {c}.", "Show the {d} staff in {c}."),
     ("Which people from {d} work in {c}?", "Give the names of {d} staff located in {c}.")),
    ("SELECT COUNT(*) FROM employees WHERE age < {n};",
     ("How many employees are younger than {n}?", "Count employees under {n}.",
      "Number of employees below age {n}?", "How many people are under {n} years old?"),
     ("What is the number of staff aged less than {n}?", "Count the people below {n} years of age.")),
)
QUESTIONS = Pools(tuple(q for _, train, _ in INTENTS for q in train), tuple(q for _, _, held in INTENTS for q in held))


def draw(rng: random.Random, split: str) -> tuple[str, str]:
    sql, train_questions, heldout_questions = pick(rng, INTENTS)
    question = pick(rng, train_questions if split == "train" else heldout_questions)
    values = dict(d=pick_or_invent(rng, DEPARTMENTS, split), c=pick_or_invent(rng, CITIES, split),
                  n=pick(rng, AGES.of(split)), s=pick(rng, SALARIES.of(split)))
    return INSTRUCTION + question.format(**values), sql.format(**values)


TASK = Task(
    name="sql",
    description="translate a question about the employees table into one SQLite query",
    max_new_tokens=40,
    draw=draw,
    pools=(DEPARTMENTS, CITIES, AGES, SALARIES, QUESTIONS),
    example=INSTRUCTION + "How many employees are in Paris?",
)
