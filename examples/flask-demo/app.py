# A Flask app as many start out: fine on the laptop, "empty reply" once in a container.
from flask import Flask

app = Flask(__name__)


@app.get("/")
def index():
    return "hello from the shop\n"
