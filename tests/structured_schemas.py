"""Twenty response formats for the structured-output tests: nested objects, enums, literals, arrays
(of arrays, of objects), required and optional (nullable) fields, as users hand them to the openai SDK's
`.parse(response_format=...)`."""

from __future__ import annotations

from enum import Enum
from typing import Literal, Optional

from pydantic import BaseModel


class Colour(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Point(BaseModel):
    x: float
    y: float


class Person(BaseModel):
    name: str
    age: int


class Flag(BaseModel):
    enabled: bool


class Paint(BaseModel):
    colour: Colour
    litres: float


class Tagged(BaseModel):
    title: str
    tags: list[str]


class Polygon(BaseModel):
    name: str
    points: list[Point]


class Team(BaseModel):
    lead: Person
    members: list[Person]


class Maybe(BaseModel):
    note: Optional[str]
    count: Optional[int]


class Mode(BaseModel):
    mode: Literal["fast", "slow", "auto"]
    retries: int


class Matrix(BaseModel):
    rows: list[list[int]]


class Address(BaseModel):
    street: str
    city: str
    zip_code: str


class Customer(BaseModel):
    person: Person
    address: Address
    vip: bool


class Inventory(BaseModel):
    items: list[Paint]
    total: int


class Event(BaseModel):
    kind: Literal["click", "view"]
    at: int
    meta: Optional[Tagged]


class Range(BaseModel):
    low: int
    high: int
    inclusive: bool


class Function(BaseModel):
    name: str
    args: list[str]
    returns: Optional[str]


class Module(BaseModel):
    path: str
    functions: list[Function]


class Vote(BaseModel):
    choice: Colour
    weight: float
    voter: Optional[Person]


class Config(BaseModel):
    debug: bool
    level: Literal[0, 1, 2]
    paths: list[str]
    owner: Person


class Segment(BaseModel):
    start: Point
    end: Point


SCHEMAS = [Point, Person, Flag, Paint, Tagged, Polygon, Team, Maybe, Mode, Matrix, Address, Customer, Inventory, Event,
           Range, Function, Module, Vote, Config, Segment]
