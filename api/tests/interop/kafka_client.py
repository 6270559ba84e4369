"""An independent Kafka client (kafka-python) for Digame's interop tests.

  kafka_client.py publish BOOTSTRAP TOPIC < records.ndjson
      each input line is {"key": "...", "value": {...}}; sends value as UTF-8 JSON
      with the key, waits for every acknowledgement, prints the count.
  kafka_client.py consume BOOTSTRAP TOPIC IDLE_SECONDS
      reads the topic from the beginning and prints each value (one JSON per line)
      until nothing arrives for IDLE_SECONDS.
  kafka_client.py placement BOOTSTRAP TOPIC IDLE_SECONDS
      the same, printing {"partition": N, "key": "..."} for each record instead.
"""

import json
import sys

from kafka import KafkaConsumer, KafkaProducer


def publish(bootstrap, topic):
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    futures = []
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        record = json.loads(line)
        futures.append(
            producer.send(
                topic,
                key=record["key"].encode("utf-8"),
                value=json.dumps(record["value"]).encode("utf-8"),
            )
        )
    for f in futures:
        f.get(timeout=30)
    producer.flush()
    producer.close()
    print(len(futures))


def consume(bootstrap, topic, idle_seconds, placement=False):
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        consumer_timeout_ms=int(float(idle_seconds) * 1000),
    )
    for message in consumer:
        if placement:
            key = message.key.decode("utf-8")
            print(json.dumps({"partition": message.partition, "key": key}))
        else:
            print(message.value.decode("utf-8"))
    consumer.close()


if __name__ == "__main__":
    command, bootstrap, topic = sys.argv[1:4]
    if command == "publish":
        publish(bootstrap, topic)
    elif command == "consume":
        consume(bootstrap, topic, sys.argv[4])
    elif command == "placement":
        consume(bootstrap, topic, sys.argv[4], placement=True)
    else:
        sys.exit(f"unknown command {command}")
